"""What a changed-block incremental inherits from its parent, checked before it is inherited.

A CBT incremental takes every chunk outside its changed-block list from the
parent's map, whole pages and subtrees by reference.  If the repository has
lost one of those chunks or pages since the parent was taken (``rebuild-index``
drops a record whose content no longer matches its digest), the new restore
point would inherit the hole, and so would every incremental after it: the
list only says what changed on the source, not what the repository still has.

:func:`check_inherited` walks the parent's map over the inherited chunk
ranges and looks up every chunk they reference in the index, one
``getmulti`` per level-0 page, each distinct page once.  The ranges it finds
missing are read from the source like changed ones, so the new restore point
is whole and the chain is healed.  The same walk counts the inherited
non-zero bytes, which the restore point's ``allocated_bytes`` needs and which
could no longer be derived from the parent's where a parent page is gone.
"""

from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass, field

from ingest.plan import Interval, intersect, union
from repofs.errors import IntegrityError
from repofs.maps import REF
from repofs.records import ZERO_DIGEST, RecordType
from repofs.repository import Repository
from repofs.restorepoint import DiskInfo


@dataclass
class PageMemo:
    """What one ingest learnt about level-0 pages, by digest, so each is checked once.

    Disks of one VM, and the ranges of one disk, often share pages (zeros
    aside, a template's clones do): their chunks are looked up only once.
    """

    missing: dict[bytes, tuple[int, ...]] = field(default_factory=dict)
    nonzero: dict[bytes, int] = field(default_factory=dict)


@dataclass
class Inheritance:
    """The result of checking what an incremental would take from its parent."""

    missing: list[Interval]  #: inherited chunk ranges the repository lacks
    nonzero_bytes: int  #: allocated bytes of the inherited chunks that are present


def _overlaps(intervals: list[Interval], starts: list[int], lo: int, hi: int) -> bool:
    """Whether ``[lo, hi)`` meets one of the sorted, disjoint ``intervals``."""
    i = bisect_right(starts, hi - 1) - 1
    return i >= 0 and intervals[i][1] > lo


def check_inherited(
    repo: Repository, parent: DiskInfo, inherited: list[Interval], memo: PageMemo
) -> Inheritance:
    """Check that every chunk and page of ``parent`` over ``inherited`` is in the index.

    ``inherited`` are sorted, disjoint chunk-index ranges inside the parent's
    disk whose chunks have the same length in parent and child.  Subtrees
    outside them are not visited, zero subtrees cost nothing, and a page that
    cannot be read (not indexed, or damaged) makes its whole range missing.
    """
    cs = repo.config.chunk_size
    p = repo.config.page_refs
    n = parent.n_chunks
    root = parent.map
    starts = [lo for lo, _hi in inherited]
    missing: list[Interval] = []
    nonzero = 0
    last_short = cs - (parent.capacity - (n - 1) * cs)  # bytes the disk's last chunk lacks
    chunk_key = bytes((RecordType.CHUNK,))
    objects = repo.index.dbs["objects"]
    stack = [(root.root, root.depth - 1, 0)]
    while stack:
        ref, level, first = stack.pop()
        span = p**level  # chunks per entry of this page
        end = min(n, first + span * p)
        if ref == ZERO_DIGEST or not _overlaps(inherited, starts, first, end):
            continue
        expected = -(-(end - first) // span)
        try:
            page = repo.page_cache.get(ref)
        except IntegrityError:
            page = b""
        if len(page) != expected * REF:  # gone, damaged or malformed: read its range anew
            missing += intersect([(first, end)], inherited)
            continue
        if level > 0:
            for k in range(expected - 1, -1, -1):  # reversed: popped in disk order
                stack.append((page[k * REF : (k + 1) * REF], level - 1, first + k * span))
            continue
        refs = [page[i : i + REF] for i in range(0, len(page), REF)]
        lacking = memo.missing.get(ref)
        if lacking is None:
            keys = [chunk_key + r for r in set(refs) if r != ZERO_DIGEST]
            with repo.index.reading() as txn, txn.cursor(db=objects) as cur:
                found = cur.getmulti(keys)
            if len(found) == len(keys):
                lacking = ()
            else:
                have = {k[1:] for k, _v in found}
                lacking = tuple(k for k, r in enumerate(refs) if r != ZERO_DIGEST and r not in have)
            memo.missing[ref] = lacking
        here = intersect([(first, end)], inherited)
        here_starts = [lo for lo, _hi in here]
        missing += [
            (first + k, first + k + 1)
            for k in lacking
            if _overlaps(here, here_starts, first + k, first + k + 1)
        ]
        whole = here == [(first, end)] and not lacking
        count = memo.nonzero.get(ref) if whole else None
        if count is None:
            gone = set(lacking)
            count = 0
            for lo, hi in here:
                part = refs[lo - first : hi - first]
                count += len(part) - part.count(ZERO_DIGEST)
                count -= sum(1 for k in gone if lo - first <= k < hi - first)
            if whole:
                memo.nonzero[ref] = count
        nonzero += count * cs
        if last_short and first <= n - 1 < end and n - 1 - first not in lacking:
            last = page[(n - 1 - first) * REF : (n - first) * REF]
            if last != ZERO_DIGEST and _overlaps(here, here_starts, n - 1, n):
                nonzero -= last_short
    return Inheritance(union(missing, []), nonzero)
