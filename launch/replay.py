"""``python -m launch replay``: replay a request trace against any SGLang-compatible URL, streamed.

Open loop: each request is sent at its trace arrival time divided by ``--rate-scale``, whatever the
server's state, as SGLang ``/generate`` with ``input_ids`` (default) or ``/v1/completions`` with a
token-id prompt, ``max_new_tokens = output_length`` and ``ignore_eos``. Token ids come from the trace's
``hash_ids`` (:mod:`launch.trace`). Per request it measures TTFT (send → first output token), TPOT and
end-to-end latency on the client, and reads prompt/cached/output token counts from the server's
``meta_info`` (or ``usage``). Every failure is recorded with its reason, never dropped.

The summary puts the engines' prefix hit ratio beside ``ideal_hit_ratio``: what an infinite cache would
have hit on the same window's requests (:func:`launch.trace.ideal_hit_ratio`, from the trace's block
ids). Early in a trace few prefixes have been seen yet, so both are low: the first minute of the Mooncake
trace can reach 4.7 % at best, the whole hour 37.4 %.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
from tqdm import tqdm

from launch.keys import AuthConfigError, client_api_key
from launch.summary import RequestRecord, format_summary, summarize
from launch.trace import (
    DEFAULT_TRACE,
    DEFAULT_VOCAB_SIZE,
    TraceError,
    TraceRequest,
    ideal_hit_ratio,
    load_trace,
    prompt_tokens,
    window,
)

_BUILD_AHEAD_S = 1.0
"""Seconds before its send time that a request's body is made (bounds the bodies held in memory)."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``replay`` subcommand's flags."""
    p.add_argument(
        "--trace",
        type=Path,
        default=DEFAULT_TRACE,
        help="Mooncake .jsonl or Azure .csv trace (default: the Mooncake trace shipped in launch/traces)",
    )
    p.add_argument(
        "--url",
        default="http://127.0.0.1:30000",
        help="router or engine base URL; several comma-separated (e.g. the active routers of launch "
        "cluster --routers K) take the requests round robin in send order (default %(default)s)",
    )
    p.add_argument(
        "--duration",
        type=float,
        default=None,
        help="send only requests due in the first S seconds (after rate scaling)",
    )
    p.add_argument(
        "--rate-scale",
        type=float,
        default=1.0,
        help="2 sends at twice the trace's rate (default %(default)s)",
    )
    p.add_argument(
        "--api",
        choices=("generate", "completions"),
        default="generate",
        help="endpoint to use (default %(default)s)",
    )
    p.add_argument(
        "--model", default=None, help="model name for /v1/completions (default: the server's first model)"
    )
    p.add_argument(
        "--vocab-size",
        type=int,
        default=DEFAULT_VOCAB_SIZE,
        help="token ids are drawn in [0, V) (default %(default)s)",
    )
    p.add_argument(
        "--timeout", type=float, default=1800.0, help="per-request timeout in seconds (default %(default)s)"
    )
    p.add_argument("--out", type=Path, default=None, help="write one JSON line per request here")
    p.add_argument("--summary-json", type=Path, default=None, help="write the summary as JSON here")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--api-key",
        default=None,
        metavar="KEY",
        help="send 'Authorization: Bearer KEY' (a router started with --api-key); KEY is file:PATH, "
        "env:NAME or the key itself (visible in ps: avoid); default: $LMETRIC_API_KEY when set, else none",
    )


def _body(api: str, model: str | None, tokens: list[int], req: TraceRequest) -> dict[str, Any]:
    if api == "generate":
        return {
            "input_ids": tokens,
            "sampling_params": {"max_new_tokens": req.output_length, "ignore_eos": True, "temperature": 0.0},
            "stream": True,
        }
    return {
        "model": model,
        "prompt": tokens,
        "max_tokens": req.output_length,
        "ignore_eos": True,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


async def send_one(
    session: aiohttp.ClientSession,
    url: str,
    api: str,
    body: bytes,
    req: TraceRequest,
    prompt_len: int,
    timeout: float,
) -> RequestRecord:
    """Send one streamed request (``body``: its JSON, from :func:`build_body`) and measure it from now.

    Never raises: failures are in ``status``.
    """
    rec = RequestRecord(start_time=time.time(), prompt_tokens=prompt_len, index=req.index)
    t0 = time.perf_counter()
    path = "/generate" if api == "generate" else "/v1/completions"
    try:
        async with session.post(
            url + path,
            data=body,
            # The trace index as the request id: the router's decision stream (``launch tail --type
            # decision``) can then be joined with ``--out``'s records.
            headers={"Content-Type": "application/json", "X-Request-Id": f"replay-{req.index}"},
            timeout=aiohttp.ClientTimeout(total=timeout),
        ) as resp:
            if resp.status != 200:
                text = (await resp.text())[:300]
                rec.status = f"HTTP {resp.status}: {text}"
                return rec
            done = False
            async for raw in resp.content:
                line = raw.strip()
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    done = True
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    rec.status = f"stream error: {json.dumps(chunk['error'])[:300]}"
                    return rec
                _absorb(api, chunk, rec, time.perf_counter() - t0)
            if not done:
                rec.status = "stream ended without [DONE]"
                return rec
    except asyncio.TimeoutError:
        rec.status = f"timeout after {timeout:.0f} s"
        return rec
    except (aiohttp.ClientError, json.JSONDecodeError, ValueError) as exc:
        rec.status = f"{type(exc).__name__}: {exc}"[:300]
        return rec
    rec.e2e = time.perf_counter() - t0
    if rec.ttft is None and rec.output_tokens == 0:
        rec.ttft = rec.e2e  # no output requested: the first byte is the answer
    if rec.ttft is not None and rec.output_tokens >= 2:
        rec.tpot = (rec.e2e - rec.ttft) / (rec.output_tokens - 1)
    return rec


def build_body(api: str, model: str | None, req: TraceRequest, vocab: int) -> tuple[bytes, int]:
    """The request's JSON body and its prompt length in tokens.

    Raises:
        TraceError: the request has too few ``hash_ids`` for its ``input_length``.
    """
    tokens = prompt_tokens(req, vocab)
    return json.dumps(_body(api, model, tokens, req)).encode(), len(tokens)


def _absorb(api: str, chunk: dict[str, Any], rec: RequestRecord, now: float) -> None:
    if api == "generate":
        meta = chunk.get("meta_info") or {}
        n = int(meta.get("completion_tokens") or 0)
        if n > 0 and rec.ttft is None:
            rec.ttft = now
        rec.output_tokens = max(rec.output_tokens, n)
        rec.prompt_tokens = int(meta.get("prompt_tokens") or rec.prompt_tokens)
        rec.cached_tokens = int(meta.get("cached_tokens") or rec.cached_tokens)
        return
    for ch in chunk.get("choices") or []:
        if ch.get("text") and rec.ttft is None:
            rec.ttft = now
    usage = chunk.get("usage")
    if usage:
        rec.prompt_tokens = int(usage.get("prompt_tokens") or rec.prompt_tokens)
        rec.output_tokens = int(usage.get("completion_tokens") or rec.output_tokens)
        details = usage.get("prompt_tokens_details") or {}
        rec.cached_tokens = int(details.get("cached_tokens") or 0)


async def _first_model(session: aiohttp.ClientSession, url: str) -> str | None:
    try:
        async with session.get(url + "/v1/models", timeout=aiohttp.ClientTimeout(total=10)) as r:
            data = await r.json()
            return str(data["data"][0]["id"])
    except (aiohttp.ClientError, KeyError, IndexError, ValueError, asyncio.TimeoutError):
        return None


def replay_urls(spec: str) -> list[str]:
    """The base URLs of ``--url`` (comma-separated, trailing slashes dropped), in order. Raises
    ``ValueError`` if none is given."""
    urls = [u.strip().rstrip("/") for u in spec.split(",") if u.strip()]
    if not urls:
        raise ValueError("--url names no URL")
    return urls


async def run_replay_async(args: argparse.Namespace) -> tuple[list[RequestRecord], dict[str, Any]]:
    """Replay the trace; returns the records (in trace order) and their summary, with the window's
    ``ideal_hit_ratio`` (infinite cache, from the trace's block ids) beside the engines' ``hit_ratio``.

    Raises:
        TraceError: the trace cannot be read.
        AuthConfigError: ``--api-key`` (or ``LMETRIC_API_KEY``) names an unreadable file or holds no key.
        ValueError: ``--url`` names no URL.
    """
    plan = window(load_trace(args.trace), args.rate_scale, args.duration)
    urls = replay_urls(args.url)
    url = urls[0]
    key = client_api_key(getattr(args, "api_key", None))
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    conn = aiohttp.TCPConnector(limit=0, force_close=False)
    async with aiohttp.ClientSession(connector=conn, headers=headers) as session:
        model = args.model
        if args.api == "completions" and model is None:
            model = await _first_model(session, url)
        bar = tqdm(total=len(plan), unit="req", disable=args.no_progress, file=sys.stderr, dynamic_ncols=True)
        failed = 0

        async def timed(offset: float, req: TraceRequest, start: float, url: str) -> RequestRecord:
            nonlocal failed
            # Build the body ahead of its send time, so that making and serialising a long prompt does
            # not delay its own send (or, within a burst of equal timestamps, the sends after it).
            delay = start + offset - _BUILD_AHEAD_S - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            body, prompt_len = build_body(args.api, model, req, args.vocab_size)
            delay = start + offset - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            rec = await send_one(session, url, args.api, body, req, prompt_len, args.timeout)
            if rec.status != "ok":
                failed += 1
                bar.set_postfix(failed=failed)
            bar.update(1)
            return rec

        start = time.perf_counter()
        records = await asyncio.gather(
            *(timed(off, r, start, urls[j % len(urls)]) for j, (off, r) in enumerate(plan))
        )
        bar.close()
    summary = summarize(records)
    summary["ideal_hit_ratio"] = ideal_hit_ratio([r for _, r in plan])
    return list(records), summary


def run_replay(args: argparse.Namespace) -> int:
    """Entry point of ``launch replay``; prints the summary and writes ``--out``/``--summary-json``."""
    try:
        records, summary = asyncio.run(run_replay_async(args))
    except (TraceError, AuthConfigError, ValueError) as exc:
        print(f"launch replay: {exc}", file=sys.stderr)
        return 2
    if args.out:
        with args.out.open("w") as f:
            for r in records:
                f.write(json.dumps(r.to_json()) + "\n")
    summary.update(trace=str(args.trace), rate_scale=args.rate_scale, url=args.url, api=args.api)
    if args.summary_json:
        args.summary_json.write_text(json.dumps(summary, indent=2) + "\n")
    print(
        format_summary(summary, f"replay of {args.trace} at rate scale {args.rate_scale} against {args.url}")
    )
    errors = sorted({r.status for r in records if r.status != "ok"})
    for e in errors[:5]:
        print(f"  failure: {e}", file=sys.stderr)
    return 0 if summary["failed"] == 0 else 1
