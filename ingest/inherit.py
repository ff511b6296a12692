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

import contextlib
import functools
import struct
from bisect import bisect_right
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from ingest.plan import Interval, complement, intersect, union
from repofs.errors import IntegrityError
from repofs.store.maps import REF
from repofs.store.records import ZERO_DIGEST, RecordType
from repofs.store.repository import Repository
from repofs.store.restorepoint import DiskInfo

#: Level-0 pages read at once: a map walk waits for one random read per page,
#: and a 1 TiB disk has 8192 of them.
PREFETCH_THREADS = 8


def _prefetch(
    repo: Repository, children: list[tuple[bytes, int, int]], pool: ThreadPoolExecutor
) -> None:
    """Load the level-0 pages under one level-1 page into the page cache, several at a time.

    Only a warm-up: a page that cannot be read fails again, and is handled,
    when the walk reaches it.
    """

    def load(ref: bytes) -> None:
        with contextlib.suppress(IntegrityError):
            repo.page_cache.get(ref)

    refs = [ref for ref, _level, _first in children if ref != ZERO_DIGEST]
    list(pool.map(load, refs))


@functools.cache
def _splitter(count: int) -> struct.Struct:
    return struct.Struct(f"{REF}s" * count)


def _split(page: bytes) -> tuple[bytes, ...]:
    """A page's references, in one C call: a Python loop of slices cost 2 s per 1 TiB disk."""
    return _splitter(len(page) // REF).unpack(page)


@dataclass
class PageMemo:
    """What one ingest learnt about level-0 pages, by digest, so each is checked once.

    Disks of one VM, and the ranges of one disk, often share pages (zeros
    aside, a template's clones do): their chunks are looked up only once.
    """

    missing: dict[bytes, tuple[int, ...]] = field(default_factory=dict)
    nonzero: dict[bytes, int] = field(default_factory=dict)
    #: sequence numbers of parents the index has held whole since their commit
    whole: set[int] = field(default_factory=set)


@dataclass
class Inheritance:
    """The result of checking what an incremental would take from its parent."""

    missing: list[Interval]  #: inherited chunk ranges the repository lacks
    nonzero_bytes: int  #: allocated bytes of the inherited chunks that are present


def _overlaps(intervals: list[Interval], starts: list[int], lo: int, hi: int) -> bool:
    """Whether ``[lo, hi)`` meets one of the sorted, disjoint ``intervals``."""
    i = bisect_right(starts, hi - 1) - 1
    return i >= 0 and intervals[i][1] > lo


def _clip(intervals: list[Interval], starts: list[int], lo: int, hi: int) -> list[Interval]:
    """The parts of the sorted, disjoint ``intervals`` inside ``[lo, hi)``, by binary search.

    ``intersect`` walks the whole list, once per page: a list of a million
    extents made that a million steps for each of a 1 TiB disk's 8192 pages.
    """
    i = max(0, bisect_right(starts, lo) - 1)
    out = []
    while i < len(intervals) and intervals[i][0] < hi:
        a, b = max(lo, intervals[i][0]), min(hi, intervals[i][1])
        if a < b:
            out.append((a, b))
        i += 1
    return out


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
    with ThreadPoolExecutor(PREFETCH_THREADS, thread_name_prefix="repofs-inherit") as pool:
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
                missing += _clip(inherited, starts, first, end)
                continue
            if level > 0:
                children = [
                    (child, level - 1, first + k * span) for k, child in enumerate(_split(page))
                ]
                if level == 1:
                    wanted = [
                        c
                        for c in children
                        if c[0] not in memo.missing
                        and _overlaps(inherited, starts, c[2], min(n, c[2] + span))
                    ]
                    _prefetch(repo, wanted, pool)
                stack += reversed(children)  # popped in disk order
                continue
            refs = _split(page)
            lacking = memo.missing.get(ref)
            if lacking is None:
                keys = [chunk_key + r for r in set(refs) if r != ZERO_DIGEST]
                with repo.index.reading() as txn, txn.cursor(db=objects) as cur:
                    found = cur.getmulti(keys)
                if len(found) == len(keys):
                    lacking = ()
                else:
                    have = {k[1:] for k, _v in found}
                    lacking = tuple(
                        k for k, r in enumerate(refs) if r != ZERO_DIGEST and r not in have
                    )
                memo.missing[ref] = lacking
            here = _clip(inherited, starts, first, end)
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


def whole_inherited_bytes(repo: Repository, parent: DiskInfo, inherited: list[Interval]) -> int:
    """Allocated bytes of the chunks taken from a parent known to be whole, cheaply.

    The parent's own ``allocated_bytes`` less its non-zero chunks that are
    not inherited: only the pages of the changed ranges are read, which is
    what keeps an incremental of a healthy repository from walking the
    parent's whole map.
    """
    cs = repo.config.chunk_size
    n = parent.n_chunks
    reader = repo.map_reader(parent)
    total = parent.allocated_bytes
    for lo, hi in complement(intersect(inherited, [(0, n)]), n):
        for k, ref in enumerate(reader.refs(lo, hi - lo)):
            if ref != ZERO_DIGEST:
                total -= min(cs, parent.capacity - (lo + k) * cs)
    return total
