"""The C page hasher (kvindex/_chash.c) against the pure-Python one, and its prefix-reuse cache (pure).

Run as a script, ``python tests/test_chash.py``, it prints the micro-benchmark quoted in docs/kvindex.md.
"""

from __future__ import annotations

import hashlib
import os
import random
import struct
import subprocess
import sys
import threading
import time
from array import array
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvindex import hashing
from kvindex.hashing import PYTHON_BACKEND, PrefixHashCache

C = hashing.C_BACKEND
PY = PYTHON_BACKEND
ROOT = Path(__file__).resolve().parents[1]

needs_c = pytest.mark.skipif(C is None, reason="kvindex._chash not built (or LMETRIC_PURE_PYTHON_HASH set)")

u32 = st.integers(min_value=0, max_value=2**32 - 1)
parents = st.one_of(st.none(), st.binary(min_size=32, max_size=32))


def run_py(fn: Callable[[], object]) -> tuple[str, object]:
    """The outcome of fn(): ("ok", result) or ("raise", exception type)."""
    try:
        return "ok", fn()
    except Exception as exc:
        return "raise", type(exc)


# ---- C == Python ------------------------------------------------------------------------------------


@needs_c
@settings(max_examples=300, deadline=None)
@given(
    tokens=st.lists(u32, max_size=200),
    page_size=st.integers(min_value=1, max_value=40),
    parent=parents,
    max_pages=st.one_of(st.none(), st.integers(min_value=-2, max_value=12)),
)
def test_c_equals_python(
    tokens: list[int], page_size: int, parent: bytes | None, max_pages: int | None
) -> None:
    assert C is not None
    assert C.chained_digests(tokens, page_size, parent, max_pages) == PY.chained_digests(
        tokens, page_size, parent, max_pages
    )
    assert C.block_hashes(tokens, page_size, parent, max_pages) == PY.block_hashes(
        tokens, page_size, parent, max_pages
    )
    raw = struct.pack(f"<{len(tokens)}I", *tokens)
    assert C.chained_digests_packed(raw, page_size, parent) == PY.chained_digests_packed(
        raw, page_size, parent
    )
    # the buffer inputs give the same answer as the list
    want = PY.block_hashes(tokens, page_size, parent, max_pages)
    assert C.block_hashes(array("I", tokens), page_size, parent, max_pages) == want
    assert C.block_hashes(np.array(tokens, dtype=np.uint32), page_size, parent, max_pages) == want
    assert C.block_hashes(np.array(tokens, dtype=np.int64), page_size, parent, max_pages) == want
    assert C.block_hashes(tuple(tokens), page_size, parent, max_pages) == want


@needs_c
@settings(max_examples=200, deadline=None)
@given(
    tokens=st.lists(u32, min_size=1, max_size=40),
    bad=st.one_of(
        st.integers(max_value=-1),
        st.integers(min_value=2**32),
        st.floats(allow_nan=False),
        st.text(max_size=2),
    ),
    where=st.integers(min_value=0),
    page_size=st.integers(min_value=1, max_value=8),
)
def test_bad_ids_fail_alike(tokens: list[int], bad: object, where: int, page_size: int) -> None:
    """Same verdict on both paths: struct.error when the bad id is in a full page, ignored in the
    trailing partial page (neither path reads it)."""
    assert C is not None
    mixed: list[object] = list(tokens)
    mixed.insert(where % (len(tokens) + 1), bad)
    for name in ("block_hashes", "chained_digests"):
        got = run_py(lambda n=name: getattr(C, n)(mixed, page_size, None, None))
        want = run_py(lambda n=name: getattr(PY, n)(mixed, page_size, None, None))
        assert got == want
        assert got[0] == "ok" or got[1] is struct.error


@needs_c
@pytest.mark.parametrize(
    "buf",
    [
        array("q", [1, 2, -3, 4]),
        array("Q", [1, 2, 2**32, 4]),
        np.array([1, 2, -3, 4], dtype=np.int32),
        np.array([[1, 2], [3, 4]], dtype=np.uint32),  # 2-D: rows are not integers
        np.array([1.0, 2.0, 3.0, 4.0]),
    ],
)
def test_bad_buffers_raise_struct_error(buf: Sequence[int]) -> None:
    assert C is not None
    with pytest.raises(struct.error):
        C.block_hashes(buf, 2, None, None)
    with pytest.raises(struct.error):
        PY.block_hashes(buf, 2, None, None)


@needs_c
def test_buffer_formats_and_views() -> None:
    assert C is not None
    toks = [random.Random(1).randrange(2**16) for _ in range(96)]
    want = PY.block_hashes(toks, 4, None, None)
    for buf in (
        array("H", toks),
        array("L", toks),
        memoryview(array("I", toks)),
        np.array(toks, dtype=np.uint16),
        np.array(toks, dtype=np.uint64),
    ):
        assert C.block_hashes(buf, 4, None, None) == want
    strided = np.repeat(np.array(toks, dtype=np.uint32), 2)[::2]  # not contiguous: read as a sequence
    assert not strided.flags.c_contiguous
    assert C.block_hashes(strided, 4, None, None) == want


@needs_c
def test_errors_of_the_arguments() -> None:
    assert C is not None
    for be in (C, PY):
        with pytest.raises(ValueError):
            be.block_hashes([1, 2], 0, None, None)
        with pytest.raises(TypeError):
            be.block_hashes(5, 2, None, None)  # type: ignore[arg-type]
        with pytest.raises(TypeError):
            be.block_hashes([1, 2], 2, "not bytes", None)  # type: ignore[arg-type]


@needs_c
def test_long_inputs_hash_correctly_from_many_threads() -> None:
    """Long inputs release the GIL while hashing; concurrent calls must not mix their chains."""
    assert C is not None
    rng = random.Random(7)
    prompts = [[rng.randrange(150_000) for _ in range(20_000)] for _ in range(4)]
    want = [PY.block_hashes(p, 16, None, None) for p in prompts]
    errors: list[int] = []

    def work(i: int) -> None:
        for _ in range(5):
            if C is None or C.block_hashes(prompts[i], 16, None, None) != want[i]:
                errors.append(i)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


# ---- backend choice at import -----------------------------------------------------------------------


def import_backend(env: dict[str, str], prelude: str = "") -> subprocess.CompletedProcess[str]:
    code = f"{prelude}import kvindex.hashing as h; print(h.BACKEND, h.block_hashes([1, 2, 3, 4], 4))"
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )


def test_env_var_forces_the_python_backend() -> None:
    out = import_backend({"LMETRIC_PURE_PYTHON_HASH": "1"})
    assert out.stdout.split()[0] == "python"
    assert "-3488128144981237669" in out.stdout
    assert out.stderr == ""  # asked for: no warning


def test_missing_extensions_fall_back_with_one_warning() -> None:
    """No C compiler at install time: neither extension is built; hashing and the index run on their
    pure-Python fallbacks with one warning line naming both."""
    blocked = "import sys; sys.modules['kvindex._chash'] = None; sys.modules['kvindex._holders'] = None; "
    index = "import kvindex.hashing as h, kvindex.index as ix, kvindex.holders as ho; g = ix.GlobalIndex(4); "
    index += "g.insert_speculative('a', h.block_hashes([1, 2, 3, 4], 4), 0.0); print(ho.BACKEND, g.total_blocks()); "
    out = import_backend({"LMETRIC_PURE_PYTHON_HASH": "", "LMETRIC_PURE_PYTHON_INDEX": ""}, blocked + index)
    assert out.stdout.split()[:2] == ["python", "1"]
    assert "-3488128144981237669" in out.stdout
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "C extensions not built: kvindex._chash" in lines[0] and "kvindex._holders" in lines[0]


@needs_c
def test_c_backend_is_the_default_when_built() -> None:
    assert import_backend({"LMETRIC_PURE_PYTHON_HASH": ""}).stdout.split()[0] == "c"


# ---- the prefix cache -------------------------------------------------------------------------------


def conversation_prompts(rng: random.Random, n: int, vocab: int) -> list[list[int]]:
    """Prompts that share prefixes the way chat traffic does: a few system prompts, conversations whose
    turns extend the previous one, re-sent prompts, truncations and edits in the middle."""
    systems = [[rng.randrange(vocab) for _ in range(rng.randrange(0, 300))] for _ in range(3)]
    convs: list[list[int]] = []
    out: list[list[int]] = []
    for _ in range(n):
        r = rng.random()
        if not convs or r < 0.2:
            convs.append(list(rng.choice(systems)))
        i = rng.randrange(len(convs))
        p = convs[i]
        if r < 0.6:
            p = p + [rng.randrange(vocab) for _ in range(rng.randrange(0, 400))]
        elif r < 0.7 and p:
            p = p[: rng.randrange(len(p))]
        elif r < 0.8 and p:
            p = list(p)
            p[rng.randrange(len(p))] = rng.randrange(vocab)
        convs[i] = p
        out.append(p)
    return out


@needs_c
@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(min_value=0, max_value=2**32),
    page_size=st.sampled_from([1, 2, 3, 16, 200]),
    parent=parents,
    max_bytes=st.sampled_from([1, 4_000, 40_000, 8 << 20]),
    key_bits=st.sampled_from([64, 3]),
)
def test_cache_equals_plain_hashing(
    seed: int, page_size: int, parent: bytes | None, max_bytes: int, key_bits: int
) -> None:
    """Whatever was cached before (evictions, superseded runs, forced key collisions with 3-bit keys),
    every answer equals the pure-Python hashing of the same request."""
    rng = random.Random(seed)
    cache = PrefixHashCache(max_bytes)
    assert cache._c is not None
    cache._c = hashing._chash.PrefixCache(max_bytes, _key_bits=key_bits)  # type: ignore[union-attr]
    for prompt in conversation_prompts(rng, 25, vocab=rng.choice([2, 50_000])):
        assert cache.block_hashes(prompt, page_size, parent) == PY.block_hashes(
            prompt, page_size, parent, None
        )
        assert cache.chained_digests(prompt, page_size, parent) == PY.chained_digests(
            prompt, page_size, parent, None
        )
    stats = cache.stats()
    assert stats["bytes"] <= max_bytes
    assert stats["requests"] == 50


@needs_c
def test_cache_reuses_a_shared_prefix_and_catches_collisions() -> None:
    rng = random.Random(3)
    base = [rng.randrange(50_000) for _ in range(4_096)]
    longer = base + [rng.randrange(50_000) for _ in range(1_000)]
    edited = list(base)
    edited[3_000] += 1
    cache = PrefixHashCache()
    cache.block_hashes(base, 16)
    assert cache.block_hashes(longer, 16) == PY.block_hashes(longer, 16, None, None)
    s = cache.stats()
    assert (s["hits"], s["reused_pages"], s["runs"]) == (1, 256, 1)  # longer supersedes base
    assert cache.block_hashes(edited, 16) == PY.block_hashes(edited, 16, None, None)
    assert cache.stats()["reused_pages"] == 256 + 187  # up to the page before the edit (3000 // 16)
    # other parent, other page size: same tokens but no reuse
    other = hashlib.sha256(b"x").digest()
    assert cache.block_hashes(base, 16, other) == PY.block_hashes(base, 16, other, None)
    assert cache.block_hashes(base, 8) == PY.block_hashes(base, 8, None, None)
    assert cache.stats()["hits"] == 2
    # 2-bit keys: unrelated prompts look alike to the table; verification must turn them away
    noisy = hashing._chash.PrefixCache(1 << 20, _key_bits=2)  # type: ignore[union-attr]
    for _ in range(20):
        p = [rng.randrange(50_000) for _ in range(1_024)]
        assert noisy.hashes(p, 16) == PY.block_hashes(p, 16, None, None)
    assert noisy.stats()["collisions"] > 0
    cache.clear()
    assert cache.stats()["runs"] == cache.stats()["bytes"] == 0


def test_cache_rejects_bad_arguments_on_every_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    for be in [PY] + ([C] if C is not None else []):
        monkeypatch.setattr(hashing, "_backend", be)
        cache = PrefixHashCache()
        with pytest.raises(ValueError):
            cache.block_hashes([1, 2], 1, b"short")
        with pytest.raises(ValueError):
            cache.block_hashes([1, 2], 0)
        with pytest.raises(struct.error):
            cache.block_hashes([1, -2], 1)
        assert cache.block_hashes([1, 2, 3, 4], 4) == [-3488128144981237669]
    with pytest.raises(ValueError):
        PrefixHashCache(0)


@needs_c
def test_cache_is_consistent_under_threads() -> None:
    rng = random.Random(11)
    prompts = conversation_prompts(rng, 40, vocab=50_000)
    prompts = [p * 8 for p in prompts]  # long enough to hash without the GIL
    want = [PY.block_hashes(p, 4, None, None) for p in prompts]
    cache = PrefixHashCache(200_000)
    errors: list[int] = []

    def work(offset: int) -> None:
        for k in range(len(prompts)):
            i = (k + offset) % len(prompts)
            if cache.block_hashes(prompts[i], 4) != want[i]:
                errors.append(i)

    threads = [threading.Thread(target=work, args=(o,)) for o in (0, 7, 19)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


# ---- micro-benchmark (not a test) -------------------------------------------------------------------


def _best_us(fn: Callable[[], object], n: int) -> float:
    fn()
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - t0) / n)
    return best * 1e6


def bench(n_tokens: int = 30_000, shared: int = 28_000, page_size: int = 16) -> None:
    """Per 30k-token prompt: Python vs C, list vs array('I'), and the prefix cache (hit and miss)."""
    rng = random.Random(0)
    base = [rng.randrange(150_000) for _ in range(shared)]
    # every call a new prompt: the shared prefix then a tail of its own (the cache must store it)
    turns = [base + [rng.randrange(150_000) for _ in range(n_tokens - shared)] for _ in range(64)]
    fresh = [[rng.randrange(150_000) for _ in range(n_tokens)] for _ in range(64)]
    pages = n_tokens // page_size
    rows: list[tuple[str, float]] = [
        ("python, list", _best_us(lambda: PY.block_hashes(turns[0], page_size, None, None), 20))
    ]
    if C is not None:
        packed = array("I", turns[0])
        rows.append(("C, list", _best_us(lambda: C.block_hashes(turns[0], page_size, None, None), 100)))
        rows.append(("C, array('I')", _best_us(lambda: C.block_hashes(packed, page_size, None, None), 100)))
        cache = PrefixHashCache()
        k = iter(range(10**9))
        rows.append(
            (
                f"C + cache, {shared // 1000}k of {n_tokens // 1000}k shared",
                _best_us(lambda: cache.block_hashes(turns[next(k) % 64], page_size), 100),
            )
        )
        small = PrefixHashCache(1 << 20)  # too small for two prompts: every call misses and evicts
        m = iter(range(10**9))
        rows.append(
            ("C + cache, miss", _best_us(lambda: small.block_hashes(fresh[next(m) % 64], page_size), 50))
        )
    print(
        f"{n_tokens} tokens, page_size {page_size} ({pages} pages), {sys.platform}, Python {sys.version.split()[0]}"
    )
    for name, us in rows:
        print(f"  {name:34s} {us:9.1f} us/prompt   {pages / us * 1e6 / 1e6:6.2f} M pages/s")


if __name__ == "__main__":
    bench()
    bench(page_size=1)
