"""Block chains: a set of blocks ordered parents first, single-child runs merged, the way SGLang merges
consecutive pages into one ``BlockStored``. Pure. Dumps of the global index and of an agent's mirror use it.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

__all__ = ["prefix_chains"]


def prefix_chains(
    blocks: Collection[int], parent_of: Mapping[int, int | None]
) -> list[tuple[int | None, list[int]]]:
    """Order ``blocks`` so that every parent comes before its children, merging single-child runs.

    Returns ``(parent_of_first, chain)`` pairs; within a chain each block is the parent of the next and
    the only child (among ``blocks``) of the previous, the way SGLang merges consecutive pages into one
    ``BlockStored``. A block whose parent is ``None`` or not in ``blocks`` starts a chain. Blocks caught
    in a parent cycle (bad input only) are still emitted, each exactly once. Does not mutate; raises
    ``KeyError`` if a block has no entry in ``parent_of``.
    """
    children: dict[int, list[int]] = {}
    roots: list[int] = []
    for h in blocks:
        p = parent_of[h]
        if p is not None and p != h and p in blocks:
            children.setdefault(p, []).append(h)
        else:
            roots.append(h)
    out: list[tuple[int | None, list[int]]] = []
    seen: set[int] = set()

    def walk(start: int) -> None:
        stack = [start]
        while stack:
            h = stack.pop()
            if h in seen:
                continue
            seen.add(h)
            chain = [h]
            kids = children.get(h)
            while kids is not None and len(kids) == 1 and kids[0] not in seen:
                h = kids[0]
                seen.add(h)
                chain.append(h)
                kids = children.get(h)
            out.append((parent_of[chain[0]], chain))
            if kids:
                stack.extend(k for k in reversed(kids) if k not in seen)

    for r in roots:
        walk(r)
    if len(seen) < len(blocks):  # parent cycles: break each at an arbitrary block
        for h in blocks:
            if h not in seen:
                walk(h)
    return out
