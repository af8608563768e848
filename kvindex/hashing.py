"""SGLang-compatible chained block hashing.

Format (SGLang ``srt/disaggregation/kv_events.py`` and the radix cache's page hashing, 0.5.23):
for each full page of ``page_size`` tokens,

    digest_k = SHA-256(digest_{k-1} || tokens_k as uint32 little-endian)     (no parent bytes for k = 0)

and the hash published on the wire is the first 8 bytes of ``digest_k`` read as a big-endian *signed*
int64. Chaining on the parent digest makes a block hash identify the whole prefix up to and including
its page, so two equal hashes mean two equal token prefixes (up to SHA-256 collisions).

A trailing partial page is never hashed: SGLang only caches (and publishes) full pages.

Speed (this is on the router's per-request path): the tokens are packed once with ``array('I')`` (a C
loop), each page costs one ``sha256(parent + page).digest()`` (the floor in pure Python: ~0.45 us a page),
and the int64s are read in one ``array('q').frombytes`` + ``byteswap`` instead of one ``int.from_bytes``
per page. About 0.3 ms for an 8,192-token prompt of 16-token pages; the results are bit-identical to the
formula above (golden values in tests/test_hashing.py).
"""

from __future__ import annotations

import hashlib
import struct
import sys
from array import array
from collections.abc import Sequence
from functools import lru_cache
from typing import NewType, cast

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


def chained_digests(
    token_ids: Sequence[int], page_size: int, parent: bytes | None = None, max_pages: int | None = None
) -> list[Digest]:
    """Digests of every full page of ``token_ids`` (``len(token_ids) // page_size`` of them).

    Args:
        token_ids: prompt token ids (each in ``[0, 2**32)``).
        page_size: tokens per page (> 0).
        parent: digest of the page before ``token_ids[0]``; ``None`` when the tokens start at the root.
        max_pages: hash at most this many pages (useful to bound work on very long prompts).

    Raises:
        ValueError: ``page_size`` is not positive.
        struct.error: a token id is negative, does not fit in uint32 or is not an integer.
    """
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


def chained_digests_packed(raw: bytes, page_size: int, parent: bytes | None = None) -> list[Digest]:
    """:func:`chained_digests` of tokens already packed as uint32 little-endian (``4 * page_size`` bytes
    a page; a trailing partial page is ignored). Pure.

    Raises:
        ValueError: ``page_size`` is not positive.
    """
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


def block_hashes(token_ids: Sequence[int], page_size: int, parent: bytes | None = None) -> list[BlockHash]:
    """Published int64 hashes of every full page of ``token_ids``; see :func:`chained_digests`.

    Golden value (checked in tests): ``block_hashes([1, 2, 3, 4], 4) == [-3488128144981237669]``.
    """
    if page_size <= 0:
        raise ValueError(f"page_size must be positive, got {page_size}")
    n_pages = len(token_ids) // page_size
    if n_pages == 0:
        return []
    digests = _chain(_pack_pages(token_ids, n_pages * page_size), 4 * page_size, n_pages, parent)
    # Every digest is 32 bytes = 4 int64s: the 1st of each 4, read big-endian, is the published hash.
    out = array("q")
    out.frombytes(b"".join(digests))
    if _LITTLE:
        out.byteswap()
    return cast("list[BlockHash]", out[::4].tolist())
