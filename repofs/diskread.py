"""Reading a restore point's disk bytes: map lookup, verified chunks, a bounded cache."""

from __future__ import annotations

import collections
import contextlib
import threading
from concurrent.futures import ThreadPoolExecutor

from repofs.errors import IntegrityError
from repofs.maps import MapReader
from repofs.records import ZERO_DIGEST, RecordType
from repofs.repository import Repository
from repofs.restorepoint import DiskInfo

_ZEROS: dict[int, bytes] = {}


def zeros(n: int) -> bytes:
    """``bytes(n)``, shared for the few sizes that recur (chunk and request sizes).

    A fresh ``bytes(n)`` of 1 MiB is a calloc whose pages fault in when
    pyfuse3 copies them to the kernel; a shared one is faulted in once.
    """
    z = _ZEROS.get(n)
    if z is None:
        z = bytes(n)
        if len(_ZEROS) < 64:
            _ZEROS[n] = z
    return z


class ChunkCache:
    """An LRU of decompressed, verified chunks, bounded in bytes, shared by all readers.

    Concurrent misses on the same chunk load it once: the others wait for
    the first, which is what keeps parallel readahead from decompressing a
    chunk twice.
    """

    def __init__(self, repo: Repository, max_bytes: int) -> None:
        self._repo = repo
        self._max = max_bytes
        self._bytes = 0
        self._items: collections.OrderedDict[bytes, bytes] = collections.OrderedDict()
        self._loading: dict[bytes, threading.Event] = {}
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, digest: bytes) -> bytes:
        while True:
            with self._lock:
                data = self._items.get(digest)
                if data is not None:
                    self._items.move_to_end(digest)
                    self.hits += 1
                    return data
                waiting = self._loading.get(digest)
                if waiting is None:
                    self._loading[digest] = threading.Event()
                    self.misses += 1
                    break
            waiting.wait()
        try:
            data = self._repo.read_object(RecordType.CHUNK, digest)
            with self._lock:
                self._items[digest] = data
                self._bytes += len(data)
                while self._bytes > self._max and self._items:
                    _, old = self._items.popitem(last=False)
                    self._bytes -= len(old)
            return data
        finally:
            with self._lock:
                self._loading.pop(digest).set()

    @property
    def size(self) -> int:
        return self._bytes


class Prefetcher:
    """Loads chunks ahead of sequential readers on a few threads.

    zstd and BLAKE3 release the GIL, so a tape sweep gets every core
    decompressing and verifying while the kernel asks for the next request.
    Errors are dropped here: the reader's own request meets them again and
    turns them into EIO.
    """

    def __init__(self, cache: ChunkCache, threads: int) -> None:
        self._cache = cache
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="repofs-prefetch")

    def load(self, digests: list[bytes]) -> None:
        for digest in digests:
            self._pool.submit(self._load, digest)

    def _load(self, digest: bytes) -> None:
        with contextlib.suppress(Exception):  # the foreground read reports it
            self._cache.get(digest)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


class DiskReader:
    """Bytes of one disk of one restore point.

    A read that starts where the previous one ended is sequential; the
    reader then keeps a window of chunks loading ahead of it, doubling the
    window on each sequential read up to :attr:`MAX_WINDOW` chunks.
    """

    MAX_WINDOW_BYTES = 8 * 1024 * 1024

    def __init__(
        self,
        repo: Repository,
        disk: DiskInfo,
        cache: ChunkCache,
        prefetcher: Prefetcher | None = None,
    ) -> None:
        self.disk = disk
        self.chunk_size = repo.config.chunk_size
        self.map: MapReader = repo.map_reader(disk)
        self._cache = cache
        self._prefetcher = prefetcher
        self._next_offset = -1
        self._window = 0
        self._ahead_to = 0  # chunks below this index were already handed to the prefetcher
        self._lock = threading.Lock()

    def _readahead(self, offset: int, end: int) -> None:
        if self._prefetcher is None:
            return
        cs = self.chunk_size
        with self._lock:
            if offset != self._next_offset:
                self._window = 0
                self._ahead_to = 0
                self._next_offset = end
                return
            self._next_offset = end
            max_window = max(2, self.MAX_WINDOW_BYTES // cs)
            self._window = min(max_window, max(4, self._window * 2))
            first = max(self._ahead_to, -(-end // cs))
            last = min(self.disk.n_chunks, end // cs + 1 + self._window)
            if first >= last:
                return
            self._ahead_to = last
        refs = [r for r in self.map.refs(first, last - first) if r != ZERO_DIGEST]
        self._prefetcher.load(refs)

    def chunk(self, i: int) -> bytes:
        cs = self.chunk_size
        length = min(cs, self.disk.capacity - i * cs)
        ref = self.map.ref_at(i)
        if ref == ZERO_DIGEST:
            return zeros(length)
        data = self._cache.get(ref)
        if len(data) != length:
            raise IntegrityError(f"chunk {ref.hex()} has {len(data)} bytes where {length} belong")
        return data

    def read(self, offset: int, size: int) -> bytes:
        """Exactly the bytes in ``[offset, offset+size)`` clipped to the capacity, or an error."""
        end = min(offset + size, self.disk.capacity)
        if offset >= end:
            return b""
        cs = self.chunk_size
        first, last = offset // cs, (end - 1) // cs
        refs = self.map.refs(first, last - first + 1)
        if all(ref == ZERO_DIGEST for ref in refs):
            # Most of a thin disk: no readahead to schedule, no bytes to build.
            with self._lock:
                self._next_offset = end
            return zeros(end - offset)
        self._readahead(offset, end)
        parts = []
        for i, ref in enumerate(refs, start=first):
            lo = max(offset, i * cs) - i * cs
            hi = min(end, (i + 1) * cs) - i * cs
            length = min(cs, self.disk.capacity - i * cs)
            if ref == ZERO_DIGEST:
                parts.append(zeros(hi - lo))
                continue
            data = self._cache.get(ref)
            if len(data) != length:
                raise IntegrityError(
                    f"chunk {ref.hex()} has {len(data)} bytes where {length} belong"
                )
            parts.append(data[lo:hi] if (lo, hi) != (0, len(data)) else data)
        return parts[0] if len(parts) == 1 else b"".join(parts)
