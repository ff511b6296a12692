"""Which chunks of a disk to read, which are zeros, and which to take from the parent.

Everything here works on sorted lists of half-open chunk-index intervals, so
planning costs O(number of extents), not O(disk size): a 1 TiB thin disk
with a few allocated ranges plans in microseconds.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Iterator

Interval = tuple[int, int]  # [start, end) in chunk indexes


class Run(enum.Enum):
    READ = "read"
    ZERO = "zero"
    PARENT = "parent"


def chunk_intervals(
    extents: Iterable[tuple[int, int]], chunk_size: int, n_chunks: int
) -> list[Interval]:
    """The chunks that byte extents touch, merged."""
    out: list[Interval] = []
    for off, length in extents:
        if length <= 0:
            continue
        a = off // chunk_size
        b = min(n_chunks, -(-(off + length) // chunk_size))
        if a >= b:
            continue
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def intersect(a: list[Interval], b: list[Interval]) -> list[Interval]:
    out, i, j = [], 0, 0
    while i < len(a) and j < len(b):
        lo, hi = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if lo < hi:
            out.append((lo, hi))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return out


def complement(a: list[Interval], n: int) -> list[Interval]:
    out, pos = [], 0
    for lo, hi in a:
        if lo > pos:
            out.append((pos, lo))
        pos = max(pos, hi)
    if pos < n:
        out.append((pos, n))
    return out


def union(a: list[Interval], b: list[Interval]) -> list[Interval]:
    out: list[Interval] = []
    for lo, hi in sorted(a + b):
        if out and lo <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return out


def plan_runs(
    n_chunks: int, allocated: list[Interval], changed: list[Interval] | None
) -> Iterator[tuple[Run, int, int]]:
    """Yield ``(kind, first chunk, count)`` covering ``[0, n_chunks)`` in order.

    Without a changed list every chunk is read or zero.  With one, chunks
    outside it come from the parent; the caller has already added to
    ``changed`` every chunk the parent cannot supply (growth, a new partial
    last chunk).
    """
    if changed is None:
        changed = [(0, n_chunks)] if n_chunks else []
    labelled = (
        [(lo, hi, Run.READ) for lo, hi in intersect(allocated, changed)]
        + [(lo, hi, Run.ZERO) for lo, hi in intersect(complement(allocated, n_chunks), changed)]
        + [(lo, hi, Run.PARENT) for lo, hi in complement(changed, n_chunks)]
    )
    labelled.sort()
    for lo, hi, kind in labelled:
        yield kind, lo, hi - lo
