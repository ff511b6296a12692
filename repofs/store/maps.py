"""Disk maps: a tree of content-addressed pages of chunk references.

A disk of ``n`` chunks has a canonical tree: level-0 page ``i`` holds the
references of chunks ``[i*P, (i+1)*P)``; a level-``k`` page holds the
references of ``P`` level-``k-1`` pages; the depth is the smallest ``d`` with
``P**d >= n``, and the root is one reference.  Because the shape depends only
on ``n``, two restore points with the same content in some range produce the
same pages there, so an incremental shares every unchanged page with its
parent for free.  The all-zero reference stands for "zeros all the way down"
at any level, which is why a 64 GiB sparse disk costs a handful of pages.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable
from dataclasses import dataclass

from repofs.errors import IntegrityError
from repofs.store.records import ZERO_DIGEST

REF = 32


def depth_for(n_chunks: int, page_refs: int) -> int:
    depth, span = 1, page_refs
    while span < n_chunks:
        depth += 1
        span *= page_refs
    return depth


@dataclass(frozen=True)
class MapRoot:
    """What a restore point records of a disk's map."""

    root: bytes
    depth: int
    n_chunks: int


class MapBuilder:
    """Builds a map streaming, in chunk order, keeping one page per level in memory.

    ``store_page(raw) -> digest`` stores a page (deduplicated by the caller).
    :meth:`add_subtree` takes a whole aligned, complete subtree from a parent
    map by reference, which is how an incremental skips unchanged ranges
    without reading their pages.
    """

    def __init__(self, n_chunks: int, page_refs: int, store_page: Callable[[bytes], bytes]) -> None:
        self.n_chunks = n_chunks
        self.page_refs = page_refs
        self.depth = depth_for(n_chunks, page_refs)
        self._store = store_page
        self._levels: list[list[bytes]] = [[] for _ in range(self.depth)]
        self._pos = 0  # chunks covered so far
        self._root: bytes | None = None

    @property
    def position(self) -> int:
        return self._pos

    def add(self, ref: bytes) -> None:
        if self._pos >= self.n_chunks:
            raise ValueError("map is already complete")
        self._levels[0].append(ref)
        self._pos += 1
        if len(self._levels[0]) == self.page_refs:
            self._flush(0)

    def extend(self, refs: list[bytes]) -> None:
        """:meth:`add` each of ``refs``, a page at a time (an incremental's partial pages)."""
        if len(refs) > self.n_chunks - self._pos:
            raise ValueError("more references than the map has room for")
        i = 0
        while i < len(refs):
            take = refs[i : i + self.page_refs - len(self._levels[0])]
            self._levels[0] += take
            self._pos += len(take)
            i += len(take)
            if len(self._levels[0]) == self.page_refs:
                self._flush(0)

    def add_subtree(self, level: int, ref: bytes) -> None:
        """Add a complete level-``level`` subtree (``P**(level+1)`` chunks) by its reference."""
        span = self.page_refs ** (level + 1)
        if self._pos % span or self._pos + span > self.n_chunks or level + 1 >= self.depth:
            raise ValueError("subtree is not aligned or not complete")
        self._levels[level + 1].append(ref)
        self._pos += span
        if len(self._levels[level + 1]) == self.page_refs:
            self._flush(level + 1)

    def largest_subtree(self, count: int) -> int:
        """The highest level whose complete subtree fits at the current position, or -1."""
        level = -1
        span = self.page_refs
        while (
            level + 2 < self.depth
            and self._pos % span == 0
            and self._pos + span <= self.n_chunks
            and count >= span
        ):
            level += 1
            span *= self.page_refs
        return level

    def add_zeros(self, count: int) -> None:
        """Add ``count`` all-zero chunks, whole zero subtrees at a time where aligned."""
        while count > 0:
            level = self.largest_subtree(count)
            if level < 0:
                step = min(count, self.page_refs - len(self._levels[0]))
                self._levels[0].extend([ZERO_DIGEST] * step)
                self._pos += step
                count -= step
                if len(self._levels[0]) == self.page_refs:
                    self._flush(0)
            else:
                self.add_subtree(level, ZERO_DIGEST)
                count -= self.page_refs ** (level + 1)

    def _page_ref(self, refs: list[bytes]) -> bytes:
        if all(r == ZERO_DIGEST for r in refs):
            return ZERO_DIGEST
        return self._store(b"".join(refs))

    def _flush(self, level: int) -> None:
        ref = self._page_ref(self._levels[level])
        self._levels[level] = []
        if level + 1 < self.depth:
            self._levels[level + 1].append(ref)
            if len(self._levels[level + 1]) == self.page_refs:
                self._flush(level + 1)
        else:
            self._root = ref

    def finish(self) -> MapRoot:
        """Close the partial pages at the end of the disk and return the root."""
        if self._pos != self.n_chunks:
            raise ValueError(f"map has {self._pos} of {self.n_chunks} chunks")
        for level in range(self.depth):
            if self._levels[level]:
                self._flush(level)
        if self._root is None:
            raise AssertionError("a map of at least one chunk always has a root")
        return MapRoot(self._root, self.depth, self.n_chunks)


class NotCached(Exception):
    """A memory-only lookup (``load=False``) needed a page that is not cached."""


class MapReader:
    """Resolves chunk indexes to references, caching decoded pages.

    ``load_page(digest) -> raw`` fetches and verifies a page.  Pages are
    immutable, so the cache never needs invalidation; it is bounded in
    pages and shared by every reader of the same repository.
    """

    def __init__(self, root: MapRoot, page_refs: int, cache: PageCache) -> None:
        self.root = root
        self.page_refs = page_refs
        self._cache = cache

    def _entries(self, digest: bytes, level: int, load: bool = True) -> bytes:
        page = self._cache.get(digest, load=load)
        if len(page) % REF or len(page) > self.page_refs * REF:
            raise IntegrityError(f"map page {digest.hex()[:16]} at level {level} is malformed")
        return page

    def subtree_ref(self, level: int, index: int, load: bool = True) -> bytes:
        """Reference of the level-``level`` node covering chunk group ``index``.

        Level ``-1`` is a chunk; level 0 a page of chunk references, and so on.
        Returns the zero digest for a range that is all zeros.
        """
        ref = self.root.root
        for node_level in range(self.root.depth - 1, level, -1):
            if ref == ZERO_DIGEST:
                return ZERO_DIGEST
            span = self.page_refs ** (node_level - 1 - level)
            slot = (index // span) % self.page_refs
            page = self._entries(ref, node_level, load)
            if (slot + 1) * REF > len(page):
                raise IntegrityError(
                    f"map page {ref.hex()[:16]} has {len(page) // REF} entries, needed slot {slot}"
                )
            ref = page[slot * REF : (slot + 1) * REF]
        return ref

    def ref_at(self, chunk_index: int) -> bytes:
        if not 0 <= chunk_index < self.root.n_chunks:
            raise IndexError(chunk_index)
        return self.subtree_ref(-1, chunk_index)

    def refs(self, first: int, count: int, load: bool = True) -> list[bytes]:
        """References of ``count`` consecutive chunks, walking each page once.

        With ``load=False`` only cached pages are used, else :class:`NotCached`.
        """
        out: list[bytes] = []
        i = first
        end = min(first + count, self.root.n_chunks)
        while i < end:
            page_ref = self.subtree_ref(0, i // self.page_refs, load)
            page_start = (i // self.page_refs) * self.page_refs
            stop = min(end, page_start + self.page_refs)
            if page_ref == ZERO_DIGEST:
                out.extend([ZERO_DIGEST] * (stop - i))
            else:
                page = self._entries(page_ref, 0, load)
                if (stop - page_start) * REF > len(page):
                    raise IntegrityError(f"map page {page_ref.hex()[:16]} is short")
                lo, hi = (i - page_start) * REF, (stop - page_start) * REF
                out += [page[j : j + REF] for j in range(lo, hi, REF)]
            i = stop
        return out


class PageCache:
    """A bounded LRU of map pages, safe to share between threads."""

    def __init__(self, load: Callable[[bytes], bytes], max_pages: int = 4096) -> None:
        self._load = load
        self._max = max_pages
        self._pages: collections.OrderedDict[bytes, bytes] = collections.OrderedDict()
        self._lock = threading.Lock()

    def get(self, digest: bytes, load: bool = True) -> bytes:
        with self._lock:
            page = self._pages.get(digest)
            if page is not None:
                self._pages.move_to_end(digest)
                return page
        if not load:
            raise NotCached(digest.hex())
        page = self._load(digest)
        with self._lock:
            self._pages[digest] = page
            while len(self._pages) > self._max:
                self._pages.popitem(last=False)
        return page
