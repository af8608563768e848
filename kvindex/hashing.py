"""SGLang-compatible chained block hashing.

Format (SGLang ``srt/disaggregation/kv_events.py`` and the radix cache's page hashing, 0.5.23):
for each full page of ``page_size`` tokens,

    digest_k = SHA-256(digest_{k-1} || tokens_k as uint32 little-endian)     (no parent bytes for k = 0)

and the hash published on the wire is the first 8 bytes of ``digest_k`` read as a big-endian *signed*
int64. Chaining on the parent digest makes a block hash identify the whole prefix up to and including
its page, so two equal hashes mean two equal token prefixes (up to SHA-256 collisions).

A trailing partial page is never hashed: SGLang only caches (and publishes) full pages.

Speed of the pure-Python path (this is on the router's per-request path): the tokens are packed once
with ``array('I')`` (a C loop), each page costs one ``sha256(parent + page).digest()`` (the floor in pure
Python: ~0.45 us a page), and the int64s are read in one ``array('q').frombytes`` + ``byteswap`` instead
of one ``int.from_bytes`` per page. About 0.3 ms for an 8,192-token prompt of 16-token pages; the results
are bit-identical to the formula above (golden values in tests/test_hashing.py).

Backends. :func:`chained_digests`, :func:`chained_digests_packed` and :func:`block_hashes` run in C
(``kvindex/_chash.c`` over OpenSSL's SHA-256, as SGLang itself hashes pages in
``srt/mem_cache/cpp_utils/hash_binding.cpp``) when that extension was built, ~3x faster on a list of
ints, else in the pure Python below with one logged warning at import. ``LMETRIC_PURE_PYTHON_HASH=1``
forces the Python path. :data:`BACKEND` says which one runs. Both give the same results and raise the
same errors; tests/test_hashing.py runs on both and tests/test_chash.py compares them on random input.

:class:`PrefixHashCache` reuses the digests of a prefix an earlier request shared (multi-turn prompts),
after checking the shared tokens byte for byte; it needs the C backend and hashes plainly without it.
"""

from __future__ import annotations

import hashlib
import os
import struct
import sys
from array import array
from collections.abc import Callable, Sequence
from functools import lru_cache
from types import ModuleType
from typing import NamedTuple, NewType, cast

from kvindex import native

BlockHash = NewType("BlockHash", int)
"""A published block hash: signed int64, the first 8 bytes (big-endian) of the chained SHA-256 digest."""

Digest = NewType("Digest", bytes)
"""A full 32-byte chained SHA-256 digest; the parent input of the next page's hash."""

_sha256 = hashlib.sha256
_from_bytes = int.from_bytes
_LITTLE = sys.byteorder == "little"
# array('I') is uint32 on every platform CPython supports in practice; fall back to struct if not.
_NATIVE_U32 = array("I").itemsize == 4


def block_hash_of(digest: bytes) -> BlockHash:
    """Return the published int64 for a 32-byte digest (first 8 bytes, big-endian, signed)."""
    return BlockHash(_from_bytes(digest[:8], "big", signed=True))


def block_hashes_of(digests: Sequence[bytes]) -> list[BlockHash]:
    """:func:`block_hash_of` of every digest, in one C-level conversion. Pure."""
    out = array("q")
    out.frombytes(b"".join([d[:8] for d in digests]))
    if _LITTLE:
        out.byteswap()
    return cast("list[BlockHash]", out.tolist())


def page_digest(parent: bytes | None, page_tokens: Sequence[int]) -> Digest:
    """SHA-256 of ``parent`` (32 bytes, or nothing at the root) followed by the tokens as uint32 LE.

    Raises ``struct.error`` if a token id is negative or does not fit in uint32.
    """
    h = _sha256(parent) if parent is not None else _sha256()
    h.update(struct.pack(f"<{len(page_tokens)}I", *page_tokens))
    return Digest(h.digest())


def _pack_pages(token_ids: Sequence[int], n_tokens: int) -> bytes:
    """The first ``n_tokens`` token ids as uint32 little-endian bytes. Raises ``struct.error``."""
    if not _NATIVE_U32:
        return struct.pack(f"<{n_tokens}I", *token_ids[:n_tokens])
    try:
        a = array("I", token_ids if len(token_ids) == n_tokens else token_ids[:n_tokens])
    except (OverflowError, TypeError) as exc:  # keep the documented error type of struct.pack
        raise struct.error(f"token id out of uint32 range or not an integer: {exc}") from exc
    if not _LITTLE:
        a.byteswap()
    return a.tobytes()


def _py_chained_digests(
    token_ids: Sequence[int], page_size: int, parent: bytes | None = None, max_pages: int | None = None
) -> list[Digest]:
    """The pure-Python :func:`chained_digests`."""
    if page_size <= 0:
        raise ValueError(f"page_size must be positive, got {page_size}")
    n_pages = len(token_ids) // page_size
    if max_pages is not None:
        n_pages = max(0, min(n_pages, max_pages))
    if n_pages == 0:
        return []
    # One pack of the whole prompt, then pages cut from the bytes: far cheaper than a pack per page.
    return cast(
        "list[Digest]", _chain(_pack_pages(token_ids, n_pages * page_size), 4 * page_size, n_pages, parent)
    )


def _py_chained_digests_packed(raw: bytes, page_size: int, parent: bytes | None = None) -> list[Digest]:
    """The pure-Python :func:`chained_digests_packed`."""
    if page_size <= 0:
        raise ValueError(f"page_size must be positive, got {page_size}")
    step = 4 * page_size
    return cast("list[Digest]", _chain(raw, step, len(raw) // step, parent))


_PAGE_GROUP = 64


@lru_cache(maxsize=16)
def _group_struct(step: int) -> struct.Struct:
    return struct.Struct(f"{step}s" * _PAGE_GROUP)


def _chain(raw: bytes, step: int, n_pages: int, parent: bytes | None) -> list[bytes]:
    """The chained digests of the first ``n_pages`` pages of ``step`` bytes of ``raw``.

    The loop body is the whole cost: one ``sha256(parent + page).digest()`` a page. Pages come out of
    ``raw`` 64 at a time from one C-level ``Struct.iter_unpack`` rather than one slice each (~15 % less).
    """
    out: list[bytes] = []
    append = out.append
    sha = _sha256
    prev = b"" if parent is None else bytes(parent)
    grouped = n_pages // _PAGE_GROUP * _PAGE_GROUP * step
    for group in _group_struct(step).iter_unpack(memoryview(raw)[:grouped]):
        for page in group:
            prev = sha(prev + page).digest()
            append(prev)
    for k in range(grouped, n_pages * step, step):
        prev = sha(prev + raw[k : k + step]).digest()
        append(prev)
    return out


def _py_block_hashes(
    token_ids: Sequence[int], page_size: int, parent: bytes | None = None, max_pages: int | None = None
) -> list[BlockHash]:
    """The pure-Python :func:`block_hashes` (``max_pages`` only to share the C backend's signature)."""
    if page_size <= 0:
        raise ValueError(f"page_size must be positive, got {page_size}")
    n_pages = len(token_ids) // page_size
    if max_pages is not None:
        n_pages = max(0, min(n_pages, max_pages))
    if n_pages == 0:
        return []
    digests = _chain(_pack_pages(token_ids, n_pages * page_size), 4 * page_size, n_pages, parent)
    # Every digest is 32 bytes = 4 int64s: the 1st of each 4, read big-endian, is the published hash.
    out = array("q")
    out.frombytes(b"".join(digests))
    if _LITTLE:
        out.byteswap()
    return cast("list[BlockHash]", out[::4].tolist())


# ---- backends --------------------------------------------------------------------------------------

_DigestsFn = Callable[[Sequence[int], int, bytes | None, int | None], list[Digest]]
_PackedFn = Callable[[bytes, int, bytes | None], list[Digest]]
_HashesFn = Callable[[Sequence[int], int, bytes | None, int | None], list[BlockHash]]


class HashBackend(NamedTuple):
    """One implementation of the three hashing entry points (same arguments, results and errors)."""

    name: str
    """``"c"`` (kvindex/_chash.c over OpenSSL) or ``"python"``."""
    chained_digests: _DigestsFn
    chained_digests_packed: _PackedFn
    block_hashes: _HashesFn


PURE_PYTHON_ENV = "LMETRIC_PURE_PYTHON_HASH"
"""Set to anything but ``""`` or ``"0"`` to force the pure-Python backend (read once, at import)."""

PYTHON_BACKEND = HashBackend("python", _py_chained_digests, _py_chained_digests_packed, _py_block_hashes)


_forced_pure = os.environ.get(PURE_PYTHON_ENV, "") not in ("", "0")
_chash: ModuleType | None = None if _forced_pure else native.load("_chash")

C_BACKEND: HashBackend | None = (
    None if _chash is None else HashBackend("c", _chash.digests, _chash.digests_packed, _chash.hashes)
)
"""The C backend, or ``None`` when the extension is not built or ``LMETRIC_PURE_PYTHON_HASH`` is set."""

_backend: HashBackend = C_BACKEND or PYTHON_BACKEND

BACKEND: str = _backend.name
"""Which backend the module-level functions use: ``"c"`` or ``"python"``."""


def chained_digests(
    token_ids: Sequence[int], page_size: int, parent: bytes | None = None, max_pages: int | None = None
) -> list[Digest]:
    """Digests (32 bytes each) of every full page of ``token_ids`` (``len(token_ids) // page_size``).

    A trailing partial page is neither hashed nor validated. Pure.

    Args:
        token_ids: prompt token ids (each in ``[0, 2**32)``): a sequence of ints; the C backend also
            reads a 1-D buffer of integers (``array('I')`` or a numpy ``uint32`` array without a copy).
        page_size: tokens per page (> 0).
        parent: digest of the page before ``token_ids[0]``; ``None`` when the tokens start at the root.
        max_pages: hash at most this many pages (useful to bound work on very long prompts).

    Raises:
        ValueError: ``page_size`` is not positive.
        struct.error: a token id is negative, does not fit in uint32 or is not an integer.
    """
    return _backend.chained_digests(token_ids, page_size, parent, max_pages)


def chained_digests_packed(raw: bytes, page_size: int, parent: bytes | None = None) -> list[Digest]:
    """:func:`chained_digests` of tokens already packed as uint32 little-endian (``4 * page_size`` bytes
    a page; a trailing partial page is ignored). Pure.

    Raises:
        ValueError: ``page_size`` is not positive.
    """
    return _backend.chained_digests_packed(raw, page_size, parent)


def block_hashes(token_ids: Sequence[int], page_size: int, parent: bytes | None = None) -> list[BlockHash]:
    """Published int64 hashes of every full page of ``token_ids``; see :func:`chained_digests` for the
    arguments and errors. Pure.

    Golden value (checked in tests): ``block_hashes([1, 2, 3, 4], 4) == [-3488128144981237669]``.
    """
    return _backend.block_hashes(token_ids, page_size, parent, None)


class PrefixHashCache:
    """:func:`block_hashes` / :func:`chained_digests` that reuse an earlier request's digests for the
    pages it shares with this one (a multi-turn prompt repeats the previous turn's).

    Correctness: a reused digest is never wrong. The cache finds a candidate earlier request through a
    seeded 64-bit key of the prefix, then checks that its page size, parent and tokens equal this
    request's byte for byte over the whole reused prefix (``memcmp``) before copying its digests; only
    the pages after the longest common prefix are hashed. A key collision costs a miss, nothing more.

    Memory: at most ``max_bytes`` (default 8 MiB) of cached requests, least recently used dropped
    first. A request of ``n`` pages costs ``n * (4 * page_size + 32)`` bytes plus 56 bytes a 128 tokens
    (keys and table), so 8 MiB holds ~87k pages of 16 tokens (~1.4 M tokens, ~45 prompts of 30k
    tokens). A request that extends a cached one replaces it, so a conversation holds one entry.

    Speed (``python tests/test_chash.py``, docs/kvindex.md): a 30k-token prompt of 16-token pages
    sharing 28k tokens with a cached one costs ~0.16 ms against ~0.29 ms for the C hashing alone; a miss
    costs ~10-15 % more than plain hashing (keys, and the copy into the cache).

    Needs the C backend: with the pure-Python one it hashes every page (no reuse) and counts nothing.
    Not thread-safe beyond the GIL's guarantees (each call is atomic with respect to the cache).
    """

    def __init__(self, max_bytes: int = 8 << 20) -> None:
        """Raises ``ValueError`` if ``max_bytes`` is not positive."""
        if max_bytes <= 0:
            raise ValueError(f"max_bytes must be positive, got {max_bytes}")
        self._c = _chash.PrefixCache(max_bytes) if _backend is C_BACKEND and _chash is not None else None

    def block_hashes(
        self, token_ids: Sequence[int], page_size: int, parent: bytes | None = None
    ) -> list[BlockHash]:
        """:func:`block_hashes`, reusing a cached shared prefix; remembers this request. Mutates the cache.

        Raises what :func:`block_hashes` raises, and ``ValueError`` if ``parent`` is not 32 bytes.
        """
        if self._c is None:
            _check_parent(parent)
            return block_hashes(token_ids, page_size, parent)
        return cast("list[BlockHash]", self._c.hashes(token_ids, page_size, parent))

    def chained_digests(
        self, token_ids: Sequence[int], page_size: int, parent: bytes | None = None
    ) -> list[Digest]:
        """:func:`chained_digests`, reusing a cached shared prefix; remembers this request. Mutates the
        cache. Raises as :meth:`block_hashes`."""
        if self._c is None:
            _check_parent(parent)
            return chained_digests(token_ids, page_size, parent)
        return cast("list[Digest]", self._c.digests(token_ids, page_size, parent))

    def stats(self) -> dict[str, int]:
        """Counters (``requests``, ``hits``, ``reused_pages``, ``hashed_pages``, ``evictions``,
        ``collisions`` caught by verification) and sizes (``runs``, ``keys``, ``bytes``, ``max_bytes``);
        empty without the C backend. Pure."""
        return {} if self._c is None else cast("dict[str, int]", self._c.stats())

    def clear(self) -> None:
        """Forget every cached request. Mutates."""
        if self._c is not None:
            self._c.clear()


def _check_parent(parent: bytes | None) -> None:
    if parent is not None and len(parent) != 32:
        raise ValueError(f"parent must be a 32-byte digest or None, got {len(parent)} bytes")
