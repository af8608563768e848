"""Per-instance record of stored block hashes and their parents, 8 bytes a block. Pure: no I/O.

The global index keeps, per block hash, only a bitmask of holders. What it needs per *instance* -- which
hashes to unset when the instance is cleared or removed, and each block's parent for a dump -- lives here,
in a form that costs 8 bytes a block instead of a set entry and a parent-map entry (~100 bytes):

* ``_hashes``: an ``array('q')`` of every hash of every ``BlockStored`` event applied to the instance, in
  event order. Entries are never removed one by one (the index cannot find them): a removed block leaves a
  *stale* entry, a block stored again gets a second entry, and the *last* entry of a hash is its current
  one. Compaction drops stale entries.
* ``_parents``: position -> parent hash, only where the parent is *not* the entry just before (the first
  hash of every event, ``None`` at the root). Within an event each hash's parent is the hash before it, so
  this costs one entry per event, not per block; since stale entries stay in place, a block whose parent
  was evicted still reports its true parent.
* ``_wide``: position -> hash, for the (bad-input-only) hashes that do not fit in an int64; their slot in
  ``_hashes`` holds a placeholder 0 that is never read as a hash.

Compaction is incremental, so that no single event pays for a whole log: :meth:`BlockLog.compact_step`
moves the next ``budget`` entries of ``_hashes`` (from ``_cursor`` on) into a compacted prefix (``_done``
with its own ``_done_parents``/``_done_wide``), keeping the live ones; once the cursor reaches the end the
prefix becomes the log. While a pass runs, the log is ``_done`` followed by ``_hashes[_cursor:]``, and
appends still go to ``_hashes``. A pass keeps order and the last entry of each live hash, but not
necessarily only that one (an earlier duplicate of a live hash looks live); :meth:`BlockLog.rebuild`
does a full, deduplicating compaction.

What must stay true: position 0 of ``_hashes`` and of ``_done`` has an explicit parent whenever the array
is not empty; every key of the parent and wide maps is a valid position in its array; ``_cursor`` is in
``[0, len(_hashes)]`` and 0 when no pass runs.
"""

from __future__ import annotations

from array import array
from collections.abc import Callable, Iterable, Iterator, Sequence

import numpy as np

__all__ = ["BlockLog"]

_NOTHING = object()


class _Part:
    """One array of entries with its explicit parents and wide hashes."""

    __slots__ = ("hashes", "parents", "wide")

    def __init__(self) -> None:
        self.hashes = array("q")
        self.parents: dict[int, int | None] = {}
        self.wide: dict[int, int] = {}

    def append(self, h: int) -> None:
        try:
            self.hashes.append(h)
        except (OverflowError, TypeError):  # not an int64: bad input, keep it aside
            self.wide[len(self.hashes)] = h
            self.hashes.append(0)

    def extend(self, hashes: Sequence[int]) -> None:
        a = self.hashes
        start = len(a)
        try:
            a.extend(hashes)
        except (OverflowError, TypeError):
            del a[start:]
            for h in hashes:
                self.append(h)

    def at(self, pos: int) -> int:
        """The hash at ``pos``."""
        return self.wide[pos] if pos in self.wide else self.hashes[pos]

    def view(self, start: int = 0, end: int | None = None) -> Sequence[int]:
        """Hashes of positions ``start..end-1`` (to the end by default), wide ones in place."""
        a = self.hashes if start == 0 and end is None else self.hashes[start:end]
        if not self.wide:
            return a
        out = a.tolist()
        for pos, h in self.wide.items():
            if start <= pos < start + len(out):
                out[pos - start] = h
        return out

    def entries(self, start: int = 0, end: int | None = None) -> Iterator[tuple[int, int | None]]:
        """``(hash, parent)`` of the entries at positions ``start..end-1``."""
        parents = self.parents
        prev: int | None = self.at(start - 1) if start else None
        for pos, h in enumerate(self.view(start, end), start):
            # An explicit entry wins, even an explicit None (a root); else the entry before is the parent.
            yield h, parents.get(pos, prev)
            prev = h

    def check(self) -> None:
        n = len(self.hashes)
        assert n == 0 or 0 in self.parents, "first entry without an explicit parent"
        assert all(0 <= p < n for p in self.parents), "parent entry past the end"
        assert all(0 <= p < n for p in self.wide), "wide entry past the end"


class BlockLog:
    """Append-only log of one instance's stored hashes with their parents. Single-owner; never raises."""

    __slots__ = ("_cursor", "_done", "_last", "_log")

    def __init__(self) -> None:
        self._log = _Part()
        self._done: _Part | None = None  # compacted prefix while a pass runs
        self._cursor = 0
        self._last: object = _NOTHING  # last hash put into _done

    def __len__(self) -> int:
        """Entries, stale and duplicate ones included."""
        n = len(self._log.hashes) - self._cursor
        return n if self._done is None else n + len(self._done.hashes)

    @property
    def compacting(self) -> bool:
        """Whether an incremental compaction pass is under way."""
        return self._done is not None

    def append_chain(self, hashes: Sequence[int], parent: int | None) -> None:
        """Log one ``BlockStored``'s hashes: ``hashes[0]``'s parent is ``parent``, each later one's the hash
        before it. Mutates."""
        if hashes:
            self._log.parents[len(self._log.hashes)] = parent
            self._log.extend(hashes)

    def hashes(self) -> Sequence[int]:
        """Every entry's hash, in log order (stale and duplicate entries included). Pure."""
        if self._done is None:
            return self._log.view()
        done, rest = self._done.view(), self._log.view(self._cursor)
        if isinstance(done, array) and isinstance(rest, array):
            return done + rest
        return [*done, *rest]

    def entries(self) -> Iterator[tuple[int, int | None]]:
        """``(hash, parent)`` of every entry, in log order. Pure."""
        if self._done is not None:
            yield from self._done.entries()
        yield from self._log.entries(self._cursor)

    def latest_parents(self) -> dict[int, int | None]:
        """Hash -> parent of its last entry, for every logged hash. O(entries). Pure."""
        return dict(self.entries())

    def compact_step(self, live: Callable[[Sequence[int]], Sequence[object]], budget: int) -> bool:
        """Move the next ``budget`` (> 0) entries through compaction, keeping those whose ``live`` flag is
        true (``live`` gets a chunk of hashes, returns one truthy flag each). Starts a pass if none runs.
        Returns True when this step finished the pass. Mutates."""
        if self._done is None:
            self._done = _Part()
            self._cursor = 0
            self._last = _NOTHING
        done, log = self._done, self._log
        start = self._cursor
        end = min(start + budget, len(log.hashes))
        if not log.wide and not done.wide:
            self._compact_vectorised(live, start, end)
        else:  # bad-input hashes present: entry by entry
            self._compact_entries(live, start, end)
        self._cursor = end
        if end < len(log.hashes):
            return False
        self._log, self._done, self._cursor, self._last = done, None, 0, _NOTHING
        return True

    def _compact_vectorised(
        self, live: Callable[[Sequence[int]], Sequence[object]], start: int, end: int
    ) -> None:
        """:meth:`_compact_entries` with numpy over the int64 arrays (same result; no wide hashes)."""
        done, log = self._done, self._log
        assert done is not None
        hs = np.frombuffer(log.hashes, dtype=np.int64)[start:end].copy()
        if not len(hs):
            return
        keep = np.asarray(live(hs), dtype=bool)
        # Each entry's parent: the entry before it, unless an explicit one is logged (None = a root).
        par = np.empty_like(hs)
        par[1:] = hs[:-1]
        par[0] = log.hashes[start - 1] if start else 0
        root = np.zeros(len(hs), dtype=bool)
        for pos, p in log.parents.items():
            if start <= pos < end:
                if p is None:
                    root[pos - start] = True
                else:
                    par[pos - start] = p
        kept = np.flatnonzero(keep)
        if not len(kept):
            return
        kh, kp, kroot = hs[kept], par[kept], root[kept]
        # An explicit parent wherever it is not the last kept hash (or is a root).
        prev = np.empty_like(kh)
        prev[1:] = kh[:-1]
        need = kroot | (kp != prev)
        last = self._last
        if last is _NOTHING or not isinstance(last, int):
            need[0] = True
        else:
            need[0] = bool(kroot[0]) or int(kp[0]) != last
        base = len(done.hashes)
        for j in np.flatnonzero(need).tolist():
            done.parents[base + j] = None if kroot[j] else int(kp[j])
        done.hashes.frombytes(kh.tobytes())
        self._last = int(kh[-1])

    def _compact_entries(
        self, live: Callable[[Sequence[int]], Sequence[object]], start: int, end: int
    ) -> None:
        done, log = self._done, self._log
        assert done is not None
        chunk = list(log.entries(start, end))
        flags = live([h for h, _p in chunk])
        last = self._last
        for (h, p), keep in zip(chunk, flags, strict=True):
            if keep:
                if p is None or p != last:
                    done.parents[len(done.hashes)] = p
                done.append(h)
                last = h
        self._last = last

    def rebuild(self, items: Iterable[tuple[int, int | None]]) -> None:
        """Replace the log with one entry per ``(hash, parent)`` of ``items``, in that order (ends any
        pass). Mutates."""
        part = _Part()
        prev: object = _NOTHING
        for h, p in items:
            if p is None or p != prev:
                part.parents[len(part.hashes)] = p
            part.append(h)
            prev = h
        self._log, self._done, self._cursor, self._last = part, None, 0, _NOTHING

    def clear(self) -> None:
        """Drop every entry (ends any pass). Mutates."""
        self._log, self._done, self._cursor, self._last = _Part(), None, 0, _NOTHING

    def check(self) -> None:
        """Assert the invariants in the module docstring (for tests). Pure; raises ``AssertionError``."""
        self._log.check()
        if self._done is None:
            assert self._cursor == 0, "cursor set without a pass"
        else:
            self._done.check()
            assert 0 <= self._cursor <= len(self._log.hashes), "cursor out of range"
