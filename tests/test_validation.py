"""Request validation (issue 13 part 4): every field checked, every error a 400 naming the field, never a 500.

Property tests (hypothesis) over request bodies: valid bodies with some known fields replaced by
arbitrary JSON, arbitrary JSON documents and arbitrary bytes, first against
:func:`kvindex.protocol.http.decode_request` (pure), then against a live router over HTTP.
"""

from __future__ import annotations

import asyncio
import json
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvindex.hashing import block_hashes
from kvindex.protocol.http import Endpoint, RequestError, decode_request, parse_chat
from kvindex.protocol.tokenizer import builtin_tokenizer
from tests.test_router import MODEL, cluster

TOKENIZER = builtin_tokenizer()

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)

BASES: dict[Endpoint, dict[str, Any]] = {
    "generate": {"text": "hello there", "sampling_params": {"max_new_tokens": 8}, "stream": False},
    "completions": {"model": MODEL, "prompt": "hello there", "max_tokens": 8},
    "chat": {
        "model": MODEL,
        "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
    },
}
SAMPLING = (
    "max_new_tokens", "min_new_tokens", "temperature", "top_p", "top_k", "min_p", "frequency_penalty",
    "presence_penalty", "repetition_penalty", "stop", "stop_token_ids", "ignore_eos", "n", "logit_bias",
    "sampling_seed", "json_schema", "regex",
)  # fmt: skip
OPENAI = (
    "model", "max_tokens", "temperature", "top_p", "n", "stream", "stream_options", "stop", "presence_penalty",
    "frequency_penalty", "logit_bias", "seed", "user", "ignore_eos", "top_k", "min_p", "min_tokens",
    "repetition_penalty", "stop_token_ids", "rid",
)  # fmt: skip
FIELDS: dict[Endpoint, tuple[str, ...]] = {
    "generate": (
        "text",
        "input_ids",
        "stream",
        "rid",
        "return_logprob",
        "top_logprobs_num",
        "sampling_params",
        *(f"sampling_params.{k}" for k in SAMPLING),
    ),
    "completions": (*OPENAI, "prompt", "echo", "logprobs", "suffix", "best_of"),
    "chat": (
        *OPENAI,
        "messages",
        "max_completion_tokens",
        "logprobs",
        "top_logprobs",
        "response_format",
        "tools",
        "tool_choice",
        "messages.0",
        "messages.1.role",
        "messages.1.content",
        "messages.1.name",
    ),
}


def _set(body: dict[str, Any], path: str, value: Any) -> None:
    """Set ``value`` at ``path`` (dots; digits index lists) if every container on the way is there."""
    keys = path.split(".")
    node: Any = body
    for k in keys:
        last = k is keys[-1]
        if isinstance(node, list) and k.isdigit() and int(k) < len(node):
            if last:
                node[int(k)] = value
            node = node[int(k)]
        elif isinstance(node, dict) and not k.isdigit():
            if last:
                node[k] = value
            node = node.setdefault(k, {})
        else:
            return


@st.composite
def mutated(draw: st.DrawFn) -> tuple[Endpoint, dict[str, Any], set[str]]:
    """A valid body of a random endpoint with 1-3 known fields set to arbitrary JSON values."""
    endpoint: Endpoint = draw(st.sampled_from(sorted(BASES)))  # type: ignore[arg-type]
    body = json.loads(json.dumps(BASES[endpoint]))
    paths = draw(st.lists(st.sampled_from(FIELDS[endpoint]), min_size=1, max_size=3, unique=True))
    for p in sorted(paths, key=len):
        _set(body, p, draw(json_values))
    return endpoint, body, {p.split(".")[0] for p in paths}


def _top(param: str) -> str:
    return param.split(".")[0].split("[")[0]


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated())
def test_a_bad_field_is_a_400_naming_that_field(case: tuple[Endpoint, dict[str, Any], set[str]]) -> None:
    endpoint, body, touched = case
    try:
        req = decode_request(endpoint, json.dumps(body).encode())
    except RequestError as exc:
        assert exc.status == 400 and exc.message
        assert exc.param is not None and _top(exc.param) in touched | {"text", "prompt", "messages"}, (
            exc.param,
            touched,
        )
        return
    ids = req.prompt_ids(TOKENIZER)  # what the router does next must not fail either
    block_hashes(ids, 16)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(["generate", "completions", "chat"]), json_values)
def test_any_json_document_is_accepted_or_a_400(endpoint: Endpoint, doc: Any) -> None:
    try:
        decode_request(endpoint, json.dumps(doc).encode())
    except RequestError as exc:
        assert exc.status == 400


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(["generate", "completions", "chat"]), st.binary(max_size=64))
def test_any_bytes_are_accepted_or_a_400(endpoint: Endpoint, raw: bytes) -> None:
    try:
        decode_request(endpoint, raw)
    except RequestError as exc:
        assert exc.status == 400


@pytest.mark.parametrize(
    ("endpoint", "body", "param"),
    [
        ("generate", {"text": "x", "sampling_params": {"n": 0}}, "sampling_params.n"),  # hypothesis found it
        ("completions", {"prompt": "x", "n": 2}, "n"),
        ("chat", {"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
        ("chat", {"messages": [{"role": "user", "content": ""}]}, "messages[0].content"),
        ("chat", {"messages": [{"role": "user"}]}, "messages[0].content"),
        ("chat", {"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
        ("chat", {"messages": [{"role": "user", "content": [{"type": "text"}]}]}, "messages[0].content[0].text"),
        ("chat", {"messages": [{"role": "user", "content": [{"type": "sound"}]}]}, "messages[0].content[0].type"),
        ("chat", {"messages": [{"role": "tool", "content": "42"}]}, "messages[0].tool_call_id"),
        ("chat", {"messages": []}, "messages"),
        ("chat", {"messages": [{"role": "user", "content": "x"}], "temperature": 2.5}, "temperature"),
        ("chat", {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 21}, "top_logprobs"),
        ("chat", {"messages": [{"role": "user", "content": "x"}], "n": 2}, "n"),
        ("chat", {"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "xml"}}, "response_format.type"),
        ("completions", {"prompt": "x", "max_tokens": 2**31}, "max_tokens"),
        ("completions", {"prompt": "x", "stop": ["a"] * 33}, "stop"),
        ("completions", {"prompt": "x", "logit_bias": {"5": 101}}, "logit_bias"),
        ("completions", {"prompt": [1, 2**32]}, "prompt[1]"),
        ("completions", {"prompt": "x", "user": "u" * 257}, "user"),
        ("completions", {"prompt": "x", "min_tokens": 9, "max_tokens": 8}, "min_tokens"),
        ("generate", {"text": "x", "sampling_params": {"top_p": 0}}, "sampling_params.top_p"),
        ("generate", {"text": "x", "sampling_params": {"top_k": 0}}, "sampling_params.top_k"),
        ("generate", {"text": "x", "sampling_params": {"repetition_penalty": 0}}, "sampling_params.repetition_penalty"),
        ("generate", {"text": "x", "sampling_params": {"temperature": "hot"}}, "sampling_params.temperature"),
        ("generate", {"text": "x", "sampling_params": {"max_new_tokens": 1.5}}, "sampling_params.max_new_tokens"),
        ("generate", {"text": "x", "sampling_params": {"stop_token_ids": [-1]}}, "sampling_params.stop_token_ids[0]"),
        ("generate", {"input_ids": []}, "input_ids"),
        ("generate", {"input_ids": [1, True]}, "input_ids[1]"),
        ("generate", {"text": "x", "input_ids": [1]}, "text"),
        ("generate", {"text": "x", "rid": 7}, "rid"),
        ("generate", {"text": "x", "stream": "yes"}, "stream"),
    ],
)  # fmt: skip
def test_each_bad_field_is_named(endpoint: Endpoint, body: dict[str, Any], param: str) -> None:
    with pytest.raises(RequestError) as err:
        decode_request(endpoint, json.dumps(body).encode())
    assert err.value.status == 400 and err.value.param == param


def test_valid_bodies_and_unknown_fields_pass() -> None:
    req = decode_request(
        "chat", json.dumps({**BASES["chat"], "max_completion_tokens": 5, "x-new": [1]}).encode()
    )
    assert req.max_new_tokens == 5 and req.messages == (
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi"},
    )
    assert parse_chat(BASES["chat"]).messages == req.messages  # the dict path validates the same way
    tool = {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f"}}]}
    decode_request("chat", json.dumps({"messages": [{"role": "user", "content": "x"}, tool]}).encode())
    req = decode_request("completions", b'{"prompt": [[1, 2, 3]], "stream": true}')
    assert req.input_ids == (1, 2, 3) and req.stream


def test_deep_nesting_anywhere_is_a_400() -> None:
    deep = "[" * 5000 + "]" * 5000
    for raw in (f'{{"text": "x", "extra": {deep}}}', f'{{"messages": {deep}}}', deep):
        with pytest.raises(RequestError, match=r"nested|Expected"):
            decode_request("chat" if "messages" in raw else "generate", raw.encode())


# ---------------------------------------------------------------------------------- against the router


@pytest.fixture(scope="module")
def router_url() -> Iterator[str]:
    """A live router (fake agent and engine) on its own event loop in a thread."""
    ready = threading.Event()
    stop: list[asyncio.Event] = []
    url: list[str] = []
    loop = asyncio.new_event_loop()

    async def run() -> None:
        async with cluster(1) as c:
            url.append(c.router.url)
            stop.append(asyncio.Event())
            ready.set()
            await stop[0].wait()

    thread = threading.Thread(target=lambda: loop.run_until_complete(run()), daemon=True)
    thread.start()
    assert ready.wait(20), "router did not start"
    yield url[0]
    loop.call_soon_threadsafe(stop[0].set)
    thread.join(20)


def _post(url: str, raw: bytes) -> tuple[int, Any]:
    req = urllib.request.Request(url, data=raw, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


PATH = {"generate": "/generate", "completions": "/v1/completions", "chat": "/v1/chat/completions"}


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mutated())
def test_the_router_never_answers_500(
    router_url: str, case: tuple[Endpoint, dict[str, Any], set[str]]
) -> None:
    endpoint, body, _touched = case
    body.pop("stream", None)
    status, answer = _post(router_url + PATH[endpoint], json.dumps(body).encode())
    assert status in (200, 400), (status, answer)
    if status == 400:
        err = answer["error"]
        assert err["code"] == 400 and err["type"] == "invalid_request_error" and err["param"], err
