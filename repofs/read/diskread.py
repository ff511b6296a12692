"""Reading a restore point's disk bytes: map lookup, verified chunks, a bounded cache."""

from __future__ import annotations

import collections
import contextlib
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from repofs.errors import IntegrityError
from repofs.store.index import Location
from repofs.store.maps import MapReader, NotCached
from repofs.store.records import RECORD_HEADER_SIZE, ZERO_DIGEST, RecordType
from repofs.store.repository import Repository
from repofs.store.restorepoint import DiskInfo

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
    chunk twice.  A chunk being loaded has a held lock in ``_loading``,
    released when the load ends: a latch that costs a twentieth of a
    ``threading.Event``, and a sequential read makes thousands.
    """

    def __init__(self, repo: Repository, max_bytes: int) -> None:
        self._repo = repo
        self._max = max_bytes
        self._bytes = 0
        self._items: collections.OrderedDict[bytes, bytes] = collections.OrderedDict()
        self._loading: dict[bytes, threading.Lock] = {}
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def _hit(self, digest: bytes) -> bytes | None:
        """The cached chunk, marked recently used; the caller holds the lock."""
        data = self._items.get(digest)
        if data is not None:
            self._items.move_to_end(digest)
            self.hits += 1
        return data

    def get(self, digest: bytes) -> bytes:
        while True:
            with self._lock:
                data = self._hit(digest)
                if data is not None:
                    return data
                waiting = self._loading.get(digest)
                if waiting is None:
                    self._loading[digest] = _held_lock()
                    self.misses += 1
                    break
            waiting.acquire()  # until the loader releases it
            waiting.release()
            # A batch load that failed for this chunk left nothing: load it here, so the
            # error (and gc's moved-pack retry) comes from the one-object path.
        try:
            data = self._repo.read_object(RecordType.CHUNK, digest)
            self._insert(digest, data)
            return data
        finally:
            self._release(digest)

    def peek(self, digest: bytes) -> bytes | None:
        """The chunk if it is cached, without loading or waiting."""
        with self._lock:
            return self._hit(digest)

    def _insert(self, digest: bytes, data: bytes) -> None:
        with self._lock:
            if digest in self._items:
                return
            self._items[digest] = data
            self._bytes += len(data)
            while self._bytes > self._max and self._items:
                _, old = self._items.popitem(last=False)
                self._bytes -= len(old)

    def _release(self, digest: bytes) -> None:
        with self._lock:
            latch = self._loading.pop(digest, None)
        if latch is not None:
            latch.release()

    def load_many(self, digests: list[bytes], submit: Callable[..., object]) -> None:
        """Start loading the chunks not cached yet, one pack read per run of neighbours.

        Ingest writes a disk's new chunks to packs in disk order, so the
        chunks ahead of a sequential reader mostly lie side by side in one
        pack: one index transaction and one ``pread`` per run replace one of
        each per chunk.  ``submit(fn, arg)`` runs a run's load on a worker.
        Failures only leave the chunks unloaded; the reader's own
        :meth:`get` meets them again and reports them.
        """
        with self._lock:
            todo = []
            for d in dict.fromkeys(digests):
                if d not in self._items and d not in self._loading:
                    self._loading[d] = _held_lock()
                    todo.append(d)
        if not todo:
            return
        try:
            locs = self._repo.index.locate_all(RecordType.CHUNK, todo)
        except Exception:
            locs = [None] * len(todo)
        found = []
        for d, loc in zip(todo, locs, strict=True):
            if loc is None:
                self._release(d)
            else:
                found.append((loc.pack_id, loc.offset, d, loc))
        found.sort()
        packs = self._repo.packs
        for run in _runs([(d, loc) for _p, _o, d, loc in found], packs.READ_GAP, packs.READ_RUN):
            try:
                submit(self._load_run, run)
            except RuntimeError:  # the pool is shutting down
                for d, _loc in run:
                    self._release(d)

    def _load_run(self, run: list[tuple[bytes, Location]]) -> None:
        """Load a run: what the on-disk cache has from there, the rest with one read per gap."""
        pending = {d for d, _ in run}  # released at most once: a latch is not an Event
        repo = self._repo
        records = repo.records
        try:
            missing = run
            if records is not None:
                missing = []
                for digest, loc in run:
                    size = RECORD_HEADER_SIZE + loc.stored_len
                    record = records.get(loc.pack_id, loc.offset, size)
                    if record is not None:
                        try:
                            chunk = repo.decode_at(RecordType.CHUNK, digest, loc, record)
                        except IntegrityError:
                            records.drop(loc.pack_id, loc.offset)
                        else:
                            self._insert(digest, chunk)
                            self._release(digest)
                            pending.discard(digest)
                            continue
                    missing.append((digest, loc))
            packs = repo.packs
            for part in _runs(missing, packs.READ_GAP, packs.READ_RUN):
                self._fetch_run(part, pending)
        except Exception:  # the reader's own get() meets it again and reports it
            pass
        finally:
            for d in pending:
                self._release(d)

    def _fetch_run(self, run: list[tuple[bytes, Location]], pending: set[bytes]) -> None:
        """One pack read for the run's records, each checked, cached, and its waiters released."""
        repo = self._repo
        first, last = run[0][1], run[-1][1]
        start = first.offset
        data = repo.packs.read(
            first.pack_id, start, last.offset + RECORD_HEADER_SIZE + last.stored_len - start
        )
        view = memoryview(data)
        for digest, loc in run:
            o = loc.offset - start
            record = view[o : o + RECORD_HEADER_SIZE + loc.stored_len]
            with contextlib.suppress(IntegrityError):
                chunk = repo.decode_at(RecordType.CHUNK, digest, loc, record)
                self._insert(digest, chunk)
                if repo.records is not None:
                    repo.records.put(loc.pack_id, loc.offset, record)
            self._release(digest)
            pending.discard(digest)

    @property
    def size(self) -> int:
        return self._bytes


def _held_lock() -> threading.Lock:
    lock = threading.Lock()
    lock.acquire()
    return lock


def _runs(
    located: list[tuple[bytes, Location]], gap: int, max_bytes: int
) -> list[list[tuple[bytes, Location]]]:
    """Split records sorted by (pack, offset) into runs worth one read each.

    Neighbours in one pack join a run through a gap up to ``gap`` bytes,
    while the run spans at most ``max_bytes``: the pack store's
    ``READ_GAP`` and ``READ_RUN``.
    """
    runs: list[list[tuple[bytes, Location]]] = []
    for item in located:
        loc = item[1]
        if runs:
            prev = runs[-1][-1][1]
            prev_end = prev.offset + RECORD_HEADER_SIZE + prev.stored_len
            if (
                loc.pack_id == prev.pack_id
                and 0 <= loc.offset - prev_end <= gap
                and loc.offset + loc.stored_len - runs[-1][0][1].offset <= max_bytes
            ):
                runs[-1].append(item)
                continue
        runs.append([item])
    return runs


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
        self._cache.load_many(digests, self._pool.submit)

    def submit(self, fn: Callable[..., object], *args: object) -> None:
        """Run ``fn(*args)`` on a prefetch thread; dropped once the pool is closing."""
        with contextlib.suppress(RuntimeError):
            self._pool.submit(fn, *args)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


class DiskReader:
    """Bytes of one disk of one restore point.

    A read that starts where the previous one ended is sequential; the
    reader then keeps a window of chunks loading ahead of it, doubling the
    window on each sequential read up to the pack store's ``READ_AHEAD`` bytes.
    """

    SEQUENTIAL_SLACK = 2 * 1024 * 1024  # two of the kernel's largest requests

    def __init__(
        self,
        repo: Repository,
        disk: DiskInfo,
        cache: ChunkCache,
        prefetcher: Prefetcher | None = None,
    ) -> None:
        self.disk = disk
        self.chunk_size = repo.config.chunk_size
        self.max_window_bytes = repo.packs.READ_AHEAD
        self._remote = repo.packs.REMOTE
        self.map: MapReader = repo.map_reader(disk)
        self._cache = cache
        self._prefetcher = prefetcher
        self._next_offset = -1
        self._window = 0
        self._ahead_to = 0  # chunks below this index were already handed to the prefetcher
        self._lock = threading.Lock()

    def _readahead(self, offset: int, end: int, background: bool = False) -> None:
        """Note a read of ``[offset, end)``; for a sequential reader, load the window ahead.

        A read that starts near where the last one ended is sequential (the
        kernel's readahead requests can arrive a little out of order).  The
        window doubles on each sequential read up to :attr:`max_window_bytes`.
        ``background`` moves the index and map lookups to a prefetch thread,
        for callers that must not block.
        """
        if self._prefetcher is None:
            return
        cs = self.chunk_size
        with self._lock:
            if abs(offset - self._next_offset) > self.SEQUENTIAL_SLACK:
                self._window = 0
                self._ahead_to = 0
                self._next_offset = end
                return
            self._next_offset = max(self._next_offset, end)
            max_window = max(2, self.max_window_bytes // cs)
            self._window = min(max_window, max(4, self._window * 2))
            first = max(self._ahead_to, -(-end // cs))
            if self._remote and self._ahead_to - -(-end // cs) > self._window // 2:
                # Enough is loading ahead.  Extending the window by each read's few
                # chunks made each GET one read's worth (360 KiB on average): from a
                # bucket, top it up half a window at a time, so runs of neighbours
                # reach the pack store's READ_RUN.
                return
            last = min(self.disk.n_chunks, end // cs + 1 + self._window)
            if first >= last:
                return
            self._ahead_to = last
        if background:
            self._prefetcher.submit(self._load_window, first, last)
        else:
            self._load_window(first, last)

    def _load_window(self, first: int, last: int) -> None:
        assert self._prefetcher is not None
        with contextlib.suppress(Exception):  # the reader's own request reports it
            refs = [r for r in self.map.refs(first, last - first) if r != ZERO_DIGEST]
            self._prefetcher.load(refs)

    def warm_map(self, max_pages: int) -> int:
        """Load up to ``max_pages`` of this disk's leaf map pages; returns how many.

        A VM booting from the disk reads it at random: each read would
        otherwise start with a map page from disk.  Thin regions (zero
        subtrees) cost nothing.  From a remote store the pages load in
        parallel on the prefetch threads (one after the other, a thousand
        round trips took seconds); the count is then of pages started.
        """
        per = self.map.page_refs
        done = 0
        spread = self._remote and self._prefetcher is not None
        for p in range(-(-self.disk.n_chunks // per)):
            if done >= max_pages:
                break
            if self.map.subtree_ref(0, p) != ZERO_DIGEST:
                if spread:
                    assert self._prefetcher is not None
                    self._prefetcher.submit(self._warm_page, p * per)
                else:
                    self.map.refs(p * per, 1)
                done += 1
        return done

    def _warm_page(self, chunk: int) -> None:
        with contextlib.suppress(Exception):  # a read of the same range reports any damage
            self.map.refs(chunk, 1)

    def read_cached(self, offset: int, size: int) -> bytes | None:
        """:meth:`read` from memory alone, or None where that would need the disk.

        Sequential readers find the chunks ahead already loaded by the
        prefetcher, so the FUSE loop answers them without a thread hop, the
        largest cost left per request once decompression runs ahead.  Never
        blocks and never raises: anything unusual goes the blocking way.
        """
        try:
            return self._read(offset, size, self._cache.peek, load=False)
        except (NotCached, IntegrityError):
            return None

    def read(self, offset: int, size: int) -> bytes:
        """Exactly the bytes in ``[offset, offset+size)`` clipped to the capacity, or an error.

        Never fewer: pyfuse3 and the kernel's page cache take a short read
        for the end of the file and fill the rest with zeros.
        """
        data = self._read(offset, size, self._cache.get, load=True)
        assert data is not None
        return data

    def _read(
        self, offset: int, size: int, fetch: Callable[[bytes], bytes | None], load: bool
    ) -> bytes | None:
        end = min(offset + size, self.disk.capacity)
        if offset >= end:
            return b""
        cs = self.chunk_size
        first, last = offset // cs, (end - 1) // cs
        refs = self.map.refs(first, last - first + 1, load)
        if len(refs) != last - first + 1:  # map_reader checks the record; this is the last word
            raise IntegrityError(
                f"the map of disk {self.disk.name} ends at chunk {first + len(refs)}, "
                f"before byte {end} of its capacity {self.disk.capacity}"
            )
        if all(ref == ZERO_DIGEST for ref in refs):
            # Most of a thin disk: no readahead to schedule, no bytes to build.
            with self._lock:
                self._next_offset = end
            return zeros(end - offset)
        if load:
            if self._remote and self._prefetcher is not None and len(refs) > 1:
                # Each chunk fetched in turn would cost a round trip: start them all at
                # once, coalesced, ahead of the readahead; the loop below then waits for
                # each one's latch.
                with contextlib.suppress(Exception):
                    self._prefetcher.load([r for r in refs if r != ZERO_DIGEST])
            self._readahead(offset, end)
        parts = []
        for i, ref in enumerate(refs, start=first):
            lo = max(offset, i * cs) - i * cs
            hi = min(end, (i + 1) * cs) - i * cs
            length = min(cs, self.disk.capacity - i * cs)
            if ref == ZERO_DIGEST:
                parts.append(zeros(hi - lo))
                continue
            data = fetch(ref)
            if data is None:
                return None
            if len(data) != length:
                raise IntegrityError(
                    f"chunk {ref.hex()} has {len(data)} bytes where {length} belong"
                )
            parts.append(data[lo:hi] if (lo, hi) != (0, len(data)) else data)
        if not load:
            self._readahead(offset, end, background=True)
        data = parts[0] if len(parts) == 1 else b"".join(parts)
        if len(data) != end - offset:  # a short read would reach the reader as zeros
            raise IntegrityError(
                f"disk {self.disk.name}: assembled {len(data)} of the {end - offset} bytes "
                f"at offset {offset}"
            )
        return data
