"""The global index's holder table: block hash -> bitmask of the instances holding it. Pure: no I/O.

Two implementations with one interface (:class:`Holders`), chosen by :func:`new_holders`:

* ``kvindex._holders.HolderTable`` (``kvindex/_holders.c``, built by ``pip install -e .`` when a C
  compiler is there): open addressing over parallel ``uint64`` arrays, ~16-27 bytes a hash, one cache
  line a probe. Masks must fit in 64 bits (instance ids 0..63): :class:`kvindex.index_core.IndexCore`
  switches to :class:`PyHolders` before it interns id :data:`C_MAX_IDS`. Keys outside int64 are kept in a
  side dict, so every int is a valid key.
* :class:`PyHolders`: a ``dict`` with the same batch methods in Python (the fallback, and the reference
  the C table is tested against, op for op, in tests/test_holders.py).

Why (docs/overhead.md, issue 12): the index's walks did a dict probe per block per pass (the match, the
speculative insert, each agent event), each a few cache misses (the index slot, the entry, the key
object); they were a third of the router's CPU at 30k-token prompts. The batch methods run each pass in
one C call.

Semantics of the batch methods (both implementations; ``hashes`` is any sequence of ints, duplicates
allowed; a ``bit``/``alive`` mask is a nonzero int; a stored mask is never 0):

* ``masks(hashes)``: each hash's mask, 0 where absent (a list).
* ``walk(hashes, alive)``: ANDs each hash's mask into ``alive`` in order; returns ``(depth, drops)``
  where ``drops`` lists ``(gone_mask, index)`` each time bits left ``alive`` and ``depth`` is the index at
  which ``alive`` became 0, else ``len(hashes)``.
* ``prefix_with(hashes, bit)``: how many leading hashes have ``bit`` set.
* ``flags(hashes, bit)``: ``bytes``, 1 where a hash's mask has ``bit`` (``hashes`` may be an int64 buffer,
  ``array('q')`` or a numpy array, read in place by the C table).
* ``or_bit(hashes, bit)`` / ``clear_bit(hashes, bit)``: set / clear ``bit`` on each hash (a missing key is
  inserted; an emptied mask is deleted); returns the hashes whose bit changed, in order.

Errors: a ``bit`` of 0 is a ``ValueError`` in ``or_bit`` / ``clear_bit`` (both). C table only (a
:class:`PyHolders` is a plain dict for single keys): a non-int hash is a ``TypeError``, storing a mask of 0
a ``ValueError``, a mask outside ``1 .. 2**64 - 1`` an ``OverflowError``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from itertools import repeat
from operator import and_, eq
from typing import Any, Protocol

from kvindex import native

__all__ = ["BACKEND", "C_MAX_IDS", "Holders", "PyHolders", "new_holders"]

C_MAX_IDS = 64
"""Instance ids the C table's 64-bit masks can carry."""

_MATCH_CHUNK = 64


class Holders(Protocol):
    """What :class:`kvindex.index_core.IndexCore` uses of a holder table (see the module docstring)."""

    def __len__(self) -> int: ...
    def __contains__(self, h: object) -> bool: ...
    def __getitem__(self, h: int) -> int: ...
    def __setitem__(self, h: int, mask: int) -> None: ...
    def __delitem__(self, h: int) -> None: ...
    def __iter__(self) -> Iterator[int]: ...
    def get(self, h: int, default: Any = None, /) -> Any: ...
    def setdefault(self, h: int, mask: int, /) -> int: ...
    def items(self) -> Iterable[tuple[int, int]]: ...
    def values(self) -> Iterable[int]: ...
    def masks(self, hashes: Sequence[int], /) -> list[int]: ...
    def walk(self, hashes: Sequence[int], alive: int, /) -> tuple[int, list[tuple[int, int]]]: ...
    def prefix_with(self, hashes: Sequence[int], bit: int, /) -> int: ...
    def or_bit(self, hashes: Sequence[int], bit: int, /) -> list[int]: ...
    def flags(self, hashes: Sequence[int], bit: int, /) -> bytes: ...
    def clear_bit(self, hashes: Sequence[int], bit: int, /) -> list[int]: ...


class PyHolders(dict[int, int]):
    """The pure-Python holder table: a ``dict`` plus the batch methods (module docstring)."""

    __slots__ = ()

    def masks(self, hashes: Sequence[int], /) -> list[int]:
        """Each hash's mask, 0 where absent."""
        return list(map(self.get, hashes, repeat(0)))

    def walk(self, hashes: Sequence[int], alive: int, /) -> tuple[int, list[tuple[int, int]]]:
        """``(depth, drops)``: see the module docstring."""
        if alive <= 0:
            raise ValueError("alive must be a positive mask")
        get = self.get
        drops: list[tuple[int, int]] = []
        depth = 0
        n = len(hashes)
        size = _MATCH_CHUNK
        # A chunk's look-ups run from C (map); inside it the next index where ``alive`` shrinks is found
        # with map + list.index, so Python runs once per drop, not once per block. Chunks double.
        while depth < n:
            masks = list(map(get, hashes[depth : depth + size], repeat(0)))
            j = 0
            while True:
                try:
                    if alive & (alive - 1):  # several bits: every one must be set
                        k = j + list(map(eq, map(and_, masks[j:], repeat(alive)), repeat(alive))).index(False)
                    else:
                        k = j + list(map(and_, masks[j:], repeat(alive))).index(0)
                except ValueError:
                    break
                new = alive & masks[k]
                drops.append((alive ^ new, depth + k))
                alive = new
                if not alive:
                    return depth + k, drops
                j = k + 1
            depth += len(masks)
            size *= 2
        return n, drops

    def prefix_with(self, hashes: Sequence[int], bit: int, /) -> int:
        """How many leading hashes have ``bit`` set."""
        held = list(map(and_, map(self.get, hashes, repeat(0)), repeat(bit)))
        try:
            return held.index(0)
        except ValueError:
            return len(held)

    def flags(self, hashes: Sequence[int], bit: int, /) -> bytes:
        """One byte a hash: 1 where its mask has ``bit``, else 0."""
        _check_mask(bit)
        seq = hashes.tolist() if hasattr(hashes, "tolist") else hashes
        return bytes(map(bool, map(and_, map(self.get, seq, repeat(0)), repeat(bit))))

    def or_bit(self, hashes: Sequence[int], bit: int, /) -> list[int]:
        """Set ``bit`` on each hash; the hashes whose bit was newly set, in order."""
        _check_mask(bit)
        get = self.get
        out: list[int] = []
        for h in hashes:
            m = get(h, 0)
            if not m & bit:
                self[h] = m | bit
                out.append(h)
        return out

    def clear_bit(self, hashes: Sequence[int], bit: int, /) -> list[int]:
        """Clear ``bit`` on each hash (dropping emptied masks); the hashes it was set on, in order."""
        _check_mask(bit)
        get = self.get
        out: list[int] = []
        for h in hashes:
            m = get(h, 0)
            if m & bit:
                m ^= bit
                if m:
                    self[h] = m
                else:
                    del self[h]
                out.append(h)
        return out


def _check_mask(bit: int) -> None:
    if bit <= 0:
        raise ValueError("holder mask must be nonzero")


_c = None if os.environ.get("LMETRIC_PURE_PYTHON_INDEX") == "1" else native.load("_holders")

BACKEND: str = "python" if _c is None else "c"
"""``"c"`` (kvindex/_holders.c) or ``"python"`` (``LMETRIC_PURE_PYTHON_INDEX=1`` forces it)."""


def new_holders(pure_python: bool = False) -> Holders:
    """An empty holder table: the C one when built (and not ``pure_python``), else :class:`PyHolders`."""
    if _c is None or pure_python:
        return PyHolders()
    table: Holders = _c.HolderTable()
    return table
