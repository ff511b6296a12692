"""Walking the maps of many restore points, visiting each shared page once.

Every restore point is a synthetic full whose map shares every unchanged
page with its neighbours.  A set of visited page digests cuts each subtree
the first time it is met again, so walking N restore points costs the
number of *distinct* pages, not N times the disk size.  ``verify``, ``gc``
and ``rebuild-index`` all walk maps this way.

The shape of a page is known from where it sits (see :mod:`repofs.store.maps`):
a level-``L`` page covering chunks ``[first, first+count)`` holds exactly
``ceil(count / P**L)`` references.  A page with another length is reported
as malformed and its subtree is not entered.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from repofs.errors import IntegrityError
from repofs.store.maps import REF, MapRoot, depth_for
from repofs.store.records import ZERO_DIGEST

LoadPage = Callable[[bytes], bytes]
#: ``(page content, index of its first chunk)`` for every newly visited level-0 page.
OnChunks = Callable[[bytes, int], None]
Interval = tuple[int, int]
Labelled = tuple[int, int, int]  #: start, end, label


@dataclass(frozen=True)
class PageFault:
    """A page (or a root) that could not be used, and the chunk range it covers."""

    digest: bytes
    level: int
    first: int
    count: int
    message: str


class MapWalker:
    """Visits pages of any number of maps, each distinct page once.

    ``load_page`` returns a verified page or raises :class:`IntegrityError`.
    Faults are collected, not raised: a verifier wants all of them, and gc
    refuses to sweep if there is any.
    """

    def __init__(self, page_refs: int, load_page: LoadPage) -> None:
        self.page_refs = page_refs
        self._load = load_page
        self.seen: set[bytes] = set()
        self.faults: list[PageFault] = []
        self.pages_loaded = 0

    def walk(self, root: MapRoot, on_chunks: OnChunks | None = None) -> None:
        """Visit every page of ``root`` not seen before; hand level-0 pages to ``on_chunks``."""
        p = self.page_refs
        if root.n_chunks <= 0 or root.depth != depth_for(root.n_chunks, p):
            needed = depth_for(max(root.n_chunks, 1), p)
            self.faults.append(
                PageFault(
                    root.root,
                    root.depth - 1,
                    0,
                    max(root.n_chunks, 0),
                    f"map root has depth {root.depth}, a disk of "
                    f"{root.n_chunks} chunks needs {needed}",
                )
            )
            return
        stack = [(root.root, root.depth - 1, 0)]
        while stack:
            ref, level, first = stack.pop()
            if ref == ZERO_DIGEST:
                continue
            key = ref + bytes((level,))
            if key in self.seen:
                continue
            self.seen.add(key)
            span = p**level  # chunks per reference in this page
            count = min(span * p, root.n_chunks - first)
            try:
                page = self._load(ref)
            except IntegrityError as exc:
                self.faults.append(PageFault(ref, level, first, count, str(exc)))
                continue
            self.pages_loaded += 1
            expected = -(-count // span)
            if len(page) != expected * REF:
                self.faults.append(
                    PageFault(
                        ref,
                        level,
                        first,
                        count,
                        f"map page {ref.hex()} at level {level} has {len(page)} bytes, "
                        f"expected {expected} references",
                    )
                )
                continue
            if level == 0:
                if on_chunks is not None:
                    on_chunks(page, first)
                continue
            for k in range(expected - 1, -1, -1):  # reversed: the stack pops them in disk order
                stack.append((page[k * REF : (k + 1) * REF], level - 1, first + k * span))


class DamageMapper:
    """Maps bad chunks and pages back to the chunk ranges of each disk that reference them.

    Every bad digest carries a label (the number of the problem that made
    it bad), and ranges keep their labels, so one walk serves every
    problem.  Results are memoised per page: mapping many restore points
    that share pages costs one walk of the distinct pages.  Pages are loaded
    again (through the caller's page cache); this only runs when something
    is wrong.
    """

    def __init__(
        self,
        page_refs: int,
        load_page: LoadPage,
        bad_chunks: dict[bytes, int],
        bad_pages: dict[bytes, int],
    ) -> None:
        self.page_refs = page_refs
        self._load = load_page
        self.bad_chunks = bad_chunks
        self.bad_pages = bad_pages
        self._memo: dict[bytes, list[Labelled]] = {}

    def chunk_ranges(self, root: MapRoot) -> dict[int, list[Interval]]:
        """Damaged ``[start, end)`` chunk ranges of one disk by label, clipped to its size."""
        if root.depth != depth_for(root.n_chunks, self.page_refs):
            label = self.bad_pages.get(root.root)
            return {label: [(0, root.n_chunks)]} if label is not None else {}
        out: dict[int, list[Interval]] = {}
        for a, b, label in self._subtree(root.root, root.depth - 1):
            b = min(b, root.n_chunks)
            if a < b:
                out.setdefault(label, []).append((a, b))
        return out

    def _subtree(self, ref: bytes, level: int) -> list[Labelled]:
        if ref == ZERO_DIGEST:
            return []
        key = ref + bytes((level,))
        hit = self._memo.get(key)
        if hit is not None:
            return hit
        p = self.page_refs
        label = self.bad_pages.get(ref)
        page = None
        if label is None:
            try:
                page = self._load(ref)
            except IntegrityError:
                label = -1  # unreadable now although the walk could read it; still damage
        if page is None:
            out = [(0, p ** (level + 1), label if label is not None else -1)]
            self._memo[key] = out
            return out
        out = []
        span = p**level
        for k in range(len(page) // REF):
            child = page[k * REF : (k + 1) * REF]
            if level == 0:
                bad = self.bad_chunks.get(child)
                parts = [(0, 1, bad)] if bad is not None else []
            else:
                parts = self._subtree(child, level - 1)
            for a, b, lab in parts:
                a, b = a + k * span, b + k * span
                if out and out[-1][2] == lab and out[-1][1] >= a:
                    out[-1] = (out[-1][0], max(out[-1][1], b), lab)
                else:
                    out.append((a, b, lab))
        self._memo[key] = out
        return out


def byte_ranges(chunks: list[Interval], chunk_size: int, capacity: int) -> list[Interval]:
    """Chunk ranges as ``[start, end)`` byte ranges of a disk of ``capacity`` bytes."""
    return [(a * chunk_size, min(b * chunk_size, capacity)) for a, b in chunks]
