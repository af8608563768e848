"""The emulated engine over real HTTP and ZeroMQ on 127.0.0.1 (OS-assigned ports, small time scale)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
import zmq
import zmq.asyncio

from agents.engine.config import ServerConfig, parse_args
from agents.engine.server import EngineServer, serve
from agents.engine.words import WORDS, words_text
from kvindex.hashing import block_hashes
from kvindex.protocol import (
    AllBlocksCleared,
    BlockStored,
    decode_kv_batch,
    decode_load_stat,
    parse_replay_reply,
    replay_request,
    split_frame,
)
from kvindex.protocol.ready import parse_ready

pytestmark = pytest.mark.timeout(20)
MODEL = "emulated-llama-3.1-8b"


@pytest.fixture
async def engine() -> AsyncIterator[EngineServer]:
    srv = EngineServer(ServerConfig(time_scale=0.001, load_interval=0.05, max_total_tokens=50_000))
    await srv.start()
    try:
        yield srv
    finally:
        await srv.stop()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as s:
        yield s


@pytest.fixture
def zsock() -> Any:
    """Factory of asyncio ZeroMQ sockets, all closed (linger 0) after the test."""
    ctx = zmq.asyncio.Context()
    socks: list[zmq.asyncio.Socket] = []

    def make(kind: int) -> zmq.asyncio.Socket:
        socks.append(ctx.socket(kind))
        return socks[-1]

    yield make
    for sock in socks:
        sock.close(linger=0)
    ctx.term()


def url(srv: EngineServer, path: str) -> str:
    return srv.endpoints["http"] + path


async def post(http: aiohttp.ClientSession, srv: EngineServer, path: str, body: Any) -> tuple[int, Any]:
    async with http.post(url(srv, path), json=body) as r:
        return r.status, await r.json()


async def sse(http: aiohttp.ClientSession, srv: EngineServer, path: str, body: Any) -> list[Any]:
    """POST a streaming request; the decoded ``data:`` payloads, ending with the string ``[DONE]``."""
    async with http.post(url(srv, path), json=body) as r:
        assert r.status == 200 and r.headers["Content-Type"].startswith("text/event-stream")
        raw = (await r.read()).decode()
    assert raw.endswith("\n\n")
    out: list[Any] = []
    for event in raw.split("\n\n")[:-1]:
        assert event.startswith("data: ")
        data = event[len("data: ") :]
        out.append(data if data == "[DONE]" else json.loads(data))
    return out


# ----------------------------------------------------------------------------------------------- HTTP


async def test_generate_non_stream_and_stream(engine: EngineServer, http: aiohttp.ClientSession) -> None:
    body = {
        "text": "The quick brown fox jumps over the lazy dog.",
        "sampling_params": {"max_new_tokens": 12, "ignore_eos": True},
    }
    status, res = await post(http, engine, "/generate", body)
    assert status == 200
    meta = res["meta_info"]
    assert meta["prompt_tokens"] == 44 and meta["completion_tokens"] == 12 and meta["cached_tokens"] == 0
    assert meta["finish_reason"] == {"type": "length", "length": 12} and meta["e2e_latency"] >= 0
    assert len(res["output_ids"]) == 12 and res["text"] == words_text(res["output_ids"], first=True)
    assert len(res["text"].split()) == 12 and set(res["text"].split()) <= set(WORDS)  # readable words
    chunks = await sse(http, engine, "/generate", {**body, "stream": True, "rid": "s1"})
    assert chunks[-1] == "[DONE]" and len(chunks) == 13
    assert all(c["meta_info"]["finish_reason"] is None for c in chunks[:-2])
    last = chunks[-2]
    assert last["meta_info"]["finish_reason"] == {"type": "length", "length": 12}
    assert last["meta_info"]["id"] == "s1" and last["meta_info"]["cached_tokens"] == 32
    assert last["text"] == words_text(last["output_ids"], first=True)
    assert [len(c["text"].split()) for c in chunks[:-1]] == list(range(1, 13))  # cumulative text
    status, again = await post(http, engine, "/generate", {**body, "rid": "s1"})
    assert again["text"] == last["text"]  # deterministic: the same request id, the same words
    # Natural stop without ignore_eos.
    status, res = await post(
        http, engine, "/generate", {"input_ids": list(range(40)), "sampling_params": {"max_new_tokens": 500}}
    )
    assert status == 200 and res["meta_info"]["finish_reason"]["type"] in ("stop", "length")


async def test_completions(engine: EngineServer, http: aiohttp.ClientSession) -> None:
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 5, "ignore_eos": True}
    status, res = await post(http, engine, "/v1/completions", body)
    assert status == 200 and res["object"] == "text_completion" and res["model"] == MODEL
    assert len(res["choices"][0]["text"].split()) == 5 and res["choices"][0]["finish_reason"] == "length"
    assert res["usage"] == {
        "prompt_tokens": 16,
        "completion_tokens": 5,
        "total_tokens": 21,
        "prompt_tokens_details": {"cached_tokens": 0},
    }
    chunks = await sse(
        http, engine, "/v1/completions", {**body, "stream": True, "stream_options": {"include_usage": True}}
    )
    assert chunks[-1] == "[DONE]"
    usage = chunks[-2]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 5
    assert chunks[-3]["choices"][0]["finish_reason"] == "length"
    assert len("".join(c["choices"][0]["text"] for c in chunks[:-2]).split()) == 5  # deltas join up
    no_usage = await sse(http, engine, "/v1/completions", {**body, "stream": True})
    assert all(c == "[DONE]" or "usage" not in c for c in no_usage)


async def test_chat_completions(engine: EngineServer, http: aiohttp.ClientSession) -> None:
    messages = [{"role": "user", "content": "hello"}]
    body = {
        "model": MODEL,
        "messages": messages,
        "max_tokens": 4,
        "ignore_eos": True,
    }
    status, res = await post(http, engine, "/v1/chat/completions", body)
    assert status == 200 and res["object"] == "chat.completion"
    msg = res["choices"][0]["message"]
    assert msg["role"] == "assistant" and len(msg["content"].split()) == 4
    assert res["usage"]["prompt_tokens"] == len(
        engine.tokenizer.encode(engine.tokenizer.apply_chat_template(messages))
    )
    chunks = await sse(
        http,
        engine,
        "/v1/chat/completions",
        {**body, "stream": True, "stream_options": {"include_usage": True}},
    )
    assert all(c == "[DONE]" or c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    content = [c["choices"][0]["delta"].get("content", "") for c in chunks[1:-3]]
    assert len("".join(content).split()) == 4
    assert chunks[-3]["choices"][0]["finish_reason"] == "length" and chunks[-3]["choices"][0]["delta"] == {}
    assert chunks[-2]["usage"]["prompt_tokens_details"]["cached_tokens"] > 0  # same prompt again


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/completions", {"model": "other", "prompt": "x"}, "model"),
        ("/v1/completions", {"prompt": "x", "max_tokens": -1}, "max_tokens"),
        ("/v1/completions", {"prompt": "x", "n": 2}, "n"),
        ("/v1/chat/completions", {"messages": []}, "messages"),
        ("/generate", {"text": ""}, "text"),
        ("/generate", {"input_ids": [1] * 60_000}, None),  # longer than the KV capacity
        ("/generate", [1, 2], None),
    ],
)
async def test_client_errors_are_400_with_sglang_bodies(
    engine: EngineServer, http: aiohttp.ClientSession, path: str, body: Any, param: str | None
) -> None:
    """SGLang 0.5.23: /generate answers ``{"error": {"message"}}`` (http_server.py
    ``_create_error_response``), /v1 endpoints the flat ``ErrorResponse`` (serving_base.py
    ``create_error_response``)."""
    status, res = await post(http, engine, path, body)
    assert status == 400
    if path == "/generate":
        assert list(res) == ["error"] and list(res["error"]) == ["message"] and res["error"]["message"]
    else:
        assert res["object"] == "error" and res["type"] == "BadRequestError" and res["code"] == 400
        assert res["param"] == param and res["message"]


async def test_malformed_json_is_400(engine: EngineServer, http: aiohttp.ClientSession) -> None:
    """Not JSON: FastAPI's validation error, which SGLang answers 400 with the flat ErrorResponse."""
    async with http.post(url(engine, "/v1/chat/completions"), data=b"{nope") as r:
        res = await r.json()
        assert r.status == 400 and "JSON" in res["message"] and res["type"] == "Bad Request"
    async with http.post(url(engine, "/generate"), data=b"\xff\xfe") as r:
        assert r.status == 400 and (await r.json())["object"] == "error"


async def test_info_endpoints(engine: EngineServer, http: aiohttp.ClientSession) -> None:
    async with http.get(url(engine, "/health")) as r:
        assert r.status == 200 and await r.text() == ""
    async with http.get(url(engine, "/health_generate")) as r:
        assert r.status == 200
    async with http.get(url(engine, "/v1/models")) as r:
        models = await r.json()
    assert models["object"] == "list" and models["data"][0]["id"] == MODEL
    assert models["data"][0]["owned_by"] == "sglang" and models["data"][0]["max_model_len"] == 131072
    async with http.get(url(engine, "/model_info")) as r:
        assert (await r.json())["is_generation"] is True
    async with http.get(url(engine, "/server_info")) as r:
        info = await r.json()
    kv = info["kv_events"]
    assert kv["publisher"] == "zmq" and kv["endpoint_host"] == "127.0.0.1" and kv["topic"] == "kv"
    assert (
        kv["endpoint_port_base"] == engine.ports["kv"]
        and kv["replay_endpoint_port_base"] == engine.ports["replay"]
    )
    assert kv["load_endpoint_port_base"] == engine.ports["load"] and kv["load_topic"] == "load"
    assert kv["block_size"] == 16 and kv["dp_size"] == 1
    assert info["max_total_num_tokens"] == 50_000 and info["page_size"] == 16
    async with http.get(url(engine, "/v1/loads")) as r:
        loads = await r.json()
    (load,) = loads["loads"]
    assert isinstance(loads["timestamp"], str) and "T" in loads["timestamp"]  # ISO 8601, as v1_loads.py
    assert load["num_used_tokens"] == load["num_tokens"] and "num_active_tokens" in load
    assert load["dp_rank"] == 0 and load["max_total_num_tokens"] == 50_000 and "token_usage" in load


async def test_metrics_expose_sglang_names(engine: EngineServer, http: aiohttp.ClientSession) -> None:
    await post(
        http,
        engine,
        "/generate",
        {"text": "metrics please", "sampling_params": {"max_new_tokens": 3, "ignore_eos": True}},
    )
    async with http.get(url(engine, "/metrics")) as r:
        text = await r.text()
    for name in (
        "sglang:num_running_reqs",
        "sglang:num_queue_reqs",
        "sglang:token_usage",
        "sglang:cache_hit_rate",
        "sglang:prompt_tokens_total",
        "sglang:generation_tokens_total",
        "sglang:cached_tokens_total",
        "sglang:time_to_first_token_seconds_bucket",
        "sglang:inter_token_latency_seconds_bucket",
        "sglang:e2e_request_latency_seconds_count",
    ):
        assert name in text, name
    assert f'sglang:generation_tokens_total{{model_name="{MODEL}"}} 3.0' in text


# ------------------------------------------------------------------------------------------------ ZMQ


async def recv(sock: zmq.asyncio.Socket, timeout: float = 3.0) -> list[bytes]:
    return list(await asyncio.wait_for(sock.recv_multipart(), timeout))


async def test_kv_events_replay_and_flush(
    engine: EngineServer, http: aiohttp.ClientSession, zsock: Any
) -> None:
    sub = zsock(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(engine.endpoints["kv"])
    await asyncio.sleep(0.3)  # PUB/SUB slow joiner
    prompts = [[(7 * i + k) % 256 for k in range(40)] for i in range(3)]
    for p in prompts:
        await post(http, engine, "/generate", {"input_ids": p, "sampling_params": {"max_new_tokens": 1}})
    batches = []
    for _ in range(3):
        topic, seq, payload = split_frame(await recv(sub))
        assert topic == b"kv"
        batches.append((seq, payload))
    assert [s for s, _ in batches] == [0, 1, 2]
    for (_, payload), p in zip(batches, prompts, strict=True):
        batch = decode_kv_batch(payload)
        assert batch.attn_dp_rank == 0 and batch.ts > 0
        (ev,) = batch.events
        assert isinstance(ev, BlockStored) and ev.block_size == 16 and ev.parent_block_hash is None
        assert list(ev.block_hashes) == block_hashes(p, 16) and list(ev.token_ids) == p[:32]
    # Replay from seq 1: batches 1 and 2, then the end marker.
    dealer = zsock(zmq.DEALER)
    dealer.connect(engine.endpoints["replay"])
    await dealer.send_multipart([b"", b"bad"])  # malformed: ignored, counted
    await dealer.send_multipart(replay_request(1))
    items = [parse_replay_reply(await recv(dealer)) for _ in range(3)]
    assert [(i.seq, i.payload) for i in items[:2]] == batches[1:]
    assert items[2].is_end
    assert engine.malformed_replay_requests == 1
    # Flush: AllBlocksCleared as the next batch.
    async with http.post(url(engine, "/flush_cache")) as r:
        assert r.status == 200 and (await r.text()).startswith("Cache flushed.")
    _, seq, payload = split_frame(await recv(sub))
    assert seq == 3 and decode_kv_batch(payload).events == (AllBlocksCleared(),)


async def test_load_frames(engine: EngineServer, zsock: Any) -> None:
    sub = zsock(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"load")
    sub.connect(engine.endpoints["load"])
    seqs = []
    for _ in range(3):
        topic, seq, payload = split_frame(await recv(sub))
        stat = decode_load_stat(payload)
        assert topic == b"load" and stat.max_total_num_tokens == 50_000 and stat.max_running_requests == 128
        seqs.append(seq)
    assert seqs == sorted(seqs) and len(set(seqs)) == 3


async def test_disconnect_aborts_and_busy_flush_is_400(http: aiohttp.ClientSession) -> None:
    srv = EngineServer(ServerConfig(time_scale=0.2))
    await srv.start()
    try:
        body = {
            "text": "keep going " * 10,
            "sampling_params": {"max_new_tokens": 5000, "ignore_eos": True},
            "stream": True,
        }
        async with http.post(url(srv, "/generate"), json=body) as r:
            assert r.status == 200
            await r.content.readuntil(b"\n\n")  # first token arrived
            async with http.post(url(srv, "/flush_cache")) as f:
                assert f.status == 400
            assert srv.core.busy
            r.close()  # client goes away mid-stream
        for _ in range(100):
            if not srv.core.busy:
                break
            await asyncio.sleep(0.02)
        assert not srv.core.busy
        assert srv.core.cache.private_tokens == 0 and srv.core.cache.protected_tokens == 0
    finally:
        await srv.stop()


async def test_shutdown_ends_open_streams(http: aiohttp.ClientSession) -> None:
    srv = EngineServer(ServerConfig(time_scale=0.2))
    await srv.start()
    body = {"model": MODEL, "prompt": "abc", "max_tokens": 5000, "ignore_eos": True, "stream": True}
    async with http.post(url(srv, "/v1/completions"), json=body) as r:
        await r.content.readuntil(b"\n\n")
        await srv.stop()
        rest = (await r.read()).decode()
    assert '"finish_reason":"abort"' in rest and rest.endswith("data: [DONE]\n\n")


async def test_serve_cancel_is_clean() -> None:
    task = asyncio.create_task(serve(ServerConfig(time_scale=0.001), announce=False))
    await asyncio.sleep(0.3)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


def test_parse_args() -> None:
    cfg = parse_args(
        ["--max-total-tokens", "1000", "--enable-mixed-chunk", "--time-scale", "0.5", "--kv-topic", "t"]
    )
    assert cfg == ServerConfig(max_total_tokens=1000, enable_mixed_chunk=True, time_scale=0.5, kv_topic="t")
    assert cfg.engine_config().mixed_chunk and cfg.engine_config().max_total_tokens == 1000
    for bad in (["--page-size", "0"], ["--profile", "nope"], ["--max-total-tokens", "-5"]):
        with pytest.raises(SystemExit):
            parse_args(bad)


def test_process_ready_line_and_sigterm() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "agents.engine.server", "--time-scale", "0.01"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert proc.stdout is not None
        ready = parse_ready(proc.stdout.readline())
        assert ready is not None and ready.role == "engine" and ready.instance is None
        assert set(ready.endpoints) == {"http", "kv", "replay", "load"}
        assert ready.endpoints["kv"].startswith("tcp://127.0.0.1:")
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=10)
        assert proc.returncode == 0 and "Traceback" not in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
