"""Golden values and chaining of the SGLang-compatible block hash (pure), on every backend.

Each test runs once on the pure-Python backend and once on the C one (kvindex/_chash.c); the C run is
skipped, not failed, where the extension is not built (no compiler or OpenSSL headers).
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterator

import pytest

from kvindex import hashing
from kvindex.hashing import (
    block_hash_of,
    block_hashes,
    block_hashes_of,
    chained_digests,
    chained_digests_packed,
    page_digest,
)


@pytest.fixture(autouse=True, params=["python", "c"])
def backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Point the module-level hashing functions at one backend for the test."""
    chosen = hashing.PYTHON_BACKEND if request.param == "python" else hashing.C_BACKEND
    if chosen is None:
        pytest.skip("kvindex._chash not built (or LMETRIC_PURE_PYTHON_HASH set)")
    monkeypatch.setattr(hashing, "_backend", chosen)
    yield request.param


def test_golden_single_page() -> None:
    assert block_hashes([1, 2, 3, 4], 4) == [-3488128144981237669]


def test_golden_matches_spec_formula() -> None:
    digest = hashlib.sha256(struct.pack("<4I", 1, 2, 3, 4)).digest()
    assert block_hash_of(digest) == int.from_bytes(digest[:8], "big", signed=True) == -3488128144981237669


def test_second_page_is_chained_on_the_first() -> None:
    a = block_hashes([1, 2, 3, 4, 5, 6, 7, 8], 4)
    b = block_hashes([9, 2, 3, 4, 5, 6, 7, 8], 4)
    assert len(a) == len(b) == 2
    assert a[0] != b[0]
    assert a[1] != b[1]  # same page tokens, different parent
    # The second page alone (no parent) hashes differently from the chained one.
    assert block_hashes([5, 6, 7, 8], 4)[0] != a[1]
    # And equals the explicit chained formula.
    d0 = hashlib.sha256(struct.pack("<4I", 1, 2, 3, 4)).digest()
    d1 = hashlib.sha256(d0 + struct.pack("<4I", 5, 6, 7, 8)).digest()
    assert a[1] == block_hash_of(d1)


def test_prefix_property() -> None:
    toks = list(range(40))
    assert block_hashes(toks[:16], 4) == block_hashes(toks, 4)[:4]


def test_partial_trailing_page_is_ignored() -> None:
    assert block_hashes([1, 2, 3, 4, 5, 6], 4) == block_hashes([1, 2, 3, 4], 4)
    assert block_hashes([1, 2, 3], 4) == []
    assert block_hashes([], 4) == []


def test_parent_argument_continues_a_chain() -> None:
    toks = [7, 8, 9, 10, 11, 12]
    digests = chained_digests(toks, 2)
    assert block_hashes(toks[2:], 2, parent=digests[0]) == block_hashes(toks, 2)[1:]
    assert page_digest(None, toks[:2]) == digests[0]


@pytest.mark.parametrize("page_size", [0, -1])
def test_non_positive_page_size_raises(page_size: int) -> None:
    with pytest.raises(ValueError):
        block_hashes([1, 2, 3, 4], page_size)


def reference_digests(tokens: list[int], page_size: int, parent: bytes | None = None) -> list[bytes]:
    """The formula, one page at a time, no shortcuts."""
    out: list[bytes] = []
    prev = parent
    for k in range(len(tokens) // page_size):
        page = struct.pack(f"<{page_size}I", *tokens[k * page_size : (k + 1) * page_size])
        prev = hashlib.sha256((prev or b"") + page).digest()
        out.append(prev)
    return out


@pytest.mark.parametrize("page_size", [1, 3, 16])
@pytest.mark.parametrize("n_pages", [0, 1, 63, 64, 65, 128, 130])  # around the 64-page groups
def test_fast_paths_equal_the_formula(page_size: int, n_pages: int) -> None:
    tokens = [(k * 2654435761) % 2**32 for k in range(n_pages * page_size + page_size - 1)]
    parent = hashlib.sha256(b"parent").digest()
    for par in (None, parent):
        ref = reference_digests(tokens, page_size, par)
        assert chained_digests(tokens, page_size, par) == ref
        assert chained_digests(tuple(tokens), page_size, par) == ref
        raw = struct.pack(f"<{len(tokens)}I", *tokens)
        assert chained_digests_packed(raw, page_size, par) == ref
        assert block_hashes(tokens, page_size, par) == [block_hash_of(d) for d in ref]
        assert block_hashes_of(ref) == [block_hash_of(d) for d in ref]
    assert chained_digests(tokens, page_size, max_pages=1) == reference_digests(tokens, page_size)[:1]


@pytest.mark.parametrize("bad", [-1, 2**32, 1.5, "7"])
def test_bad_token_ids_raise_struct_error(bad: object) -> None:
    tokens: list[object] = [1, 2, bad, 4]
    with pytest.raises(struct.error):
        block_hashes(tokens, 2)  # type: ignore[arg-type]
    with pytest.raises(struct.error):
        chained_digests(tokens, 2)  # type: ignore[arg-type]
