"""Reading a restore point's disk bytes: map lookup, verified chunks, a bounded cache."""

from __future__ import annotations

import collections
import threading

from repofs.errors import IntegrityError
from repofs.maps import MapReader
from repofs.records import ZERO_DIGEST, RecordType
from repofs.repository import Repository
from repofs.restorepoint import DiskInfo


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


class DiskReader:
    """Bytes of one disk of one restore point."""

    def __init__(self, repo: Repository, disk: DiskInfo, cache: ChunkCache) -> None:
        self.disk = disk
        self.chunk_size = repo.config.chunk_size
        self.map: MapReader = repo.map_reader(disk)
        self._cache = cache

    def chunk(self, i: int) -> bytes:
        cs = self.chunk_size
        length = min(cs, self.disk.capacity - i * cs)
        ref = self.map.ref_at(i)
        if ref == ZERO_DIGEST:
            return bytes(length)
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
        parts = []
        for i, ref in enumerate(self.map.refs(first, last - first + 1), start=first):
            lo = max(offset, i * cs) - i * cs
            hi = min(end, (i + 1) * cs) - i * cs
            length = min(cs, self.disk.capacity - i * cs)
            if ref == ZERO_DIGEST:
                parts.append(bytes(hi - lo))
                continue
            data = self._cache.get(ref)
            if len(data) != length:
                raise IntegrityError(f"chunk {ref.hex()} has {len(data)} bytes where {length} belong")
            parts.append(data[lo:hi] if (lo, hi) != (0, len(data)) else data)
        return parts[0] if len(parts) == 1 else b"".join(parts)
