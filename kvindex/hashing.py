"""SGLang-compatible chained block hashing.

Format (SGLang ``srt/disaggregation/kv_events.py`` and the radix cache's page hashing, 0.5.23):
for each full page of ``page_size`` tokens,

    digest_k = SHA-256(digest_{k-1} || tokens_k as uint32 little-endian)     (no parent bytes for k = 0)

and the hash published on the wire is the first 8 bytes of ``digest_k`` read as a big-endian *signed*
int64. Chaining on the parent digest makes a block hash identify the whole prefix up to and including
its page, so two equal hashes mean two equal token prefixes (up to SHA-256 collisions).

A trailing partial page is never hashed: SGLang only caches (and publishes) full pages.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence
from typing import NewType

BlockHash = NewType("BlockHash", int)
"""A published block hash: signed int64, the first 8 bytes (big-endian) of the chained SHA-256 digest."""

Digest = NewType("Digest", bytes)
"""A full 32-byte chained SHA-256 digest; the parent input of the next page's hash."""

_sha256 = hashlib.sha256
_from_bytes = int.from_bytes


def block_hash_of(digest: bytes) -> BlockHash:
    """Return the published int64 for a 32-byte digest (first 8 bytes, big-endian, signed)."""
    return BlockHash(_from_bytes(digest[:8], "big", signed=True))


def page_digest(parent: bytes | None, page_tokens: Sequence[int]) -> Digest:
    """SHA-256 of ``parent`` (32 bytes, or nothing at the root) followed by the tokens as uint32 LE.

    Raises ``struct.error`` if a token id is negative or does not fit in uint32.
    """
    h = _sha256(parent) if parent is not None else _sha256()
    h.update(struct.pack(f"<{len(page_tokens)}I", *page_tokens))
    return Digest(h.digest())


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
    """
    if page_size <= 0:
        raise ValueError(f"page_size must be positive, got {page_size}")
    n_pages = len(token_ids) // page_size
    if max_pages is not None:
        n_pages = min(n_pages, max_pages)
    out: list[Digest] = []
    # One struct.pack of the whole prompt, then slices of the bytes: far cheaper than a pack per page.
    raw = struct.pack(f"<{n_pages * page_size}I", *token_ids[: n_pages * page_size])
    step = 4 * page_size
    prev = parent
    for k in range(n_pages):
        h = _sha256(prev) if prev is not None else _sha256()
        h.update(raw[k * step : (k + 1) * step])
        prev = h.digest()
        out.append(Digest(prev))
    return out


def block_hashes(token_ids: Sequence[int], page_size: int, parent: bytes | None = None) -> list[BlockHash]:
    """Published int64 hashes of every full page of ``token_ids``; see :func:`chained_digests`.

    Golden value (checked in tests): ``block_hashes([1, 2, 3, 4], 4) == [-3488128144981237669]``.
    """
    return [block_hash_of(d) for d in chained_digests(token_ids, page_size, parent)]
