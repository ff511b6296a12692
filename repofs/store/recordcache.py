"""A bounded on-disk cache of records read from a bucket's packs, beside the memory cache.

A mount of an ``s3://`` repository would otherwise download every chunk
again after each remount; a tape sweep that reads the same restore point
twice, or a VM booted twice, would pay the object store both times.  This
cache keeps the records exactly as they were read from the packs (sealed,
compressed), one file per record, named by pack id and offset:
``chunks/<2 hex>/<pack id>-<offset>``.  Packs never change once written and
their ids are random, so a name always means the same bytes.

Nothing here is trusted: every record read back goes through the same
check as one read from the bucket (:meth:`Repository.decode_at`), and a
file that fails it is removed and the record fetched again.  Losing the
whole directory loses nothing.

Records are written by a thread of their own, so a reader never waits for
the cache's disk; what arrives while that thread is more than
:data:`WRITE_QUEUE_BYTES` behind is not kept.

Several processes of one host share the directory safely: a record is
written to a temporary file and renamed into place (a reader sees a whole
file or none), and eviction runs under an ``flock``.  Each process counts
what it wrote since it last scanned the directory; when that count would
take the total over the bound, it scans the directory (under the lock),
removes the least recently used files (a hit sets a file's mtime) down to
:data:`LOW_WATER` of the bound, and counts again from what is left.  A
record that would still not fit is simply not cached.  With several
writing processes each rescans after :data:`RESCAN_FRACTION` of the bound,
so the directory may exceed the bound by about that much per process.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import fcntl
import logging
import os
import threading
import zlib

log = logging.getLogger("repofs.store.recordcache")

CACHE_SUBDIR = "chunks"
LOW_WATER = 0.8  #: eviction keeps this fraction of the bound
RESCAN_FRACTION = 0.25  #: bytes written (as a fraction of the bound) before counting again
MAX_RECORD_FRACTION = 16  #: records larger than bound/16 are not cached
WRITE_QUEUE_BYTES = 64 * 1024 * 1024  #: records waiting for the writer thread, at most


class RecordCache:
    """Records by (pack id, offset) in files under ``root``, at most ``max_bytes`` of them."""

    def __init__(self, root: str, max_bytes: int) -> None:
        self.root = root
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._evicting = threading.Lock()
        self._bytes: int | None = None  # unknown until the first scan
        self._since_scan = 0
        self._broken = False  # the directory cannot be written: stop trying (logged once)
        self._full_logged = False
        self._queue: collections.deque[tuple[bytes, int, bytes]] = collections.deque()
        self._queued = 0
        self._queue_cond = threading.Condition()
        self._writer: threading.Thread | None = None
        self.dropped = 0
        self.hits = 0
        self.misses = 0
        self.evicted = 0

    # -- names ----------------------------------------------------------------------

    def _path(self, pack_id: bytes, offset: int) -> str:
        name = f"{pack_id.hex()}-{offset:x}"
        sub = f"{zlib.crc32(name.encode()) & 0xFF:02x}"
        return os.path.join(self.root, sub, name)

    # -- reading --------------------------------------------------------------------

    def get(self, pack_id: bytes, offset: int, length: int) -> bytes | None:
        """The record's bytes if cached with the right length; never raises."""
        if self.max_bytes <= 0:
            return None
        path = self._path(pack_id, offset)
        try:
            with open(path, "rb") as f:
                data = f.read(length + 1)
        except OSError:
            self.misses += 1
            return None
        if len(data) != length:
            self.drop(pack_id, offset)
            self.misses += 1
            return None
        with contextlib.suppress(OSError):
            os.utime(path)  # the LRU's clock: atime is not updated on most mounts
        self.hits += 1
        return data

    def drop(self, pack_id: bytes, offset: int) -> None:
        """Forget a record that failed its check (it is fetched again)."""
        path = self._path(pack_id, offset)
        try:
            size = os.stat(path).st_size
            os.unlink(path)
        except OSError:
            return
        with self._lock:
            if self._bytes is not None:
                self._bytes = max(0, self._bytes - size)

    # -- writing --------------------------------------------------------------------

    def put(self, pack_id: bytes, offset: int, data: bytes | memoryview) -> None:
        """Keep a record that passed its check, later, on a thread of its own.

        Never waits for the disk: a reader that waited for each record's
        file halved a cold sequential read (dirty-page throttling on a busy
        disk).  Records queued beyond :data:`WRITE_QUEUE_BYTES` are not kept.
        """
        size = len(data)
        if self.max_bytes <= 0 or self._broken or size > self.max_bytes // MAX_RECORD_FRACTION:
            return
        with self._queue_cond:
            if self._queued + size > WRITE_QUEUE_BYTES:
                self.dropped += 1
                return
            self._queue.append((pack_id, offset, bytes(data)))
            self._queued += size
            if self._writer is None:
                self._writer = threading.Thread(
                    target=self._write_loop, name="repofs-cache-writer", daemon=True
                )
                self._writer.start()
            self._queue_cond.notify()

    def _write_loop(self) -> None:
        while True:
            with self._queue_cond:
                while not self._queue:
                    self._queue_cond.wait()
                pack_id, offset, data = self._queue[0]
            try:
                self._write(pack_id, offset, data)
            except Exception:  # the writer must live on; a record not kept is only a miss
                log.exception("writing the chunk cache")
            with self._queue_cond:
                self._queue.popleft()
                self._queued -= len(data)
                self._queue_cond.notify_all()

    def flush(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the queued records; True if all were written."""
        with self._queue_cond:
            return self._queue_cond.wait_for(lambda: not self._queue, timeout)

    def _write(self, pack_id: bytes, offset: int, data: bytes) -> None:
        size = len(data)
        if self._broken or not self._reserve(size):
            return
        path = self._path(pack_id, offset)
        tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
        try:
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            except FileNotFoundError:
                self._make_dirs(os.path.dirname(path))
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
            finally:
                os.close(fd)
            os.rename(tmp, path)  # no fsync: a record lost or torn by a crash is a miss
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            with self._lock:
                if self._bytes is not None:
                    self._bytes -= size
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                # A full file system (others filled it): skip records until there is room.
                if not self._full_logged:
                    self._full_logged = True
                    log.warning("%s: no space for the chunk cache; records not kept", self.root)
            elif not self._broken:
                self._broken = True
                log.warning(
                    "%s: cannot write the chunk cache (%s); reading without it",
                    self.root,
                    exc.strerror or exc,
                )

    def _reserve(self, size: int) -> bool:
        """Count ``size`` more bytes if they fit under the bound, evicting first if needed."""
        for _attempt in range(2):
            with self._lock:
                if (
                    self._bytes is not None
                    and self._bytes + size <= self.max_bytes
                    and self._since_scan <= self.max_bytes * RESCAN_FRACTION
                ):
                    self._bytes += size
                    self._since_scan += size
                    return True
            if not self._evicting.acquire(blocking=False):
                return False  # another thread is evicting: skip this one record
            try:
                self._evict()
            finally:
                self._evicting.release()
        return False

    def _evict(self) -> None:
        """Scan the directory (all processes' files), remove the oldest down to the low water."""
        try:
            self._make_dirs(self.root)
            lock_fd = os.open(
                os.path.join(self.root, ".lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600
            )
        except OSError as exc:
            self._broken = True
            log.warning("%s: cannot use the chunk cache (%s)", self.root, exc.strerror or exc)
            return
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX)
            files = self._scan()
            total = sum(size for _mtime, size, _path in files)
            if total > self.max_bytes * LOW_WATER:
                files.sort()
                target = int(self.max_bytes * LOW_WATER)
                for _mtime, size, path in files:
                    if total <= target:
                        break
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(path)
                    total -= size
                    self.evicted += 1
            with self._lock:
                self._bytes = total
                self._since_scan = 0
        finally:
            os.close(lock_fd)  # releases the flock

    def _make_dirs(self, path: str) -> None:
        """``chunks/`` and ``chunks/XX``, never the cache directory above them.

        If someone deleted the whole cache directory under a running mount,
        recreating it here would leave a directory without its mark, which
        the next command refuses as "not a repofs cache".
        """
        for directory in (self.root, path) if path != self.root else (self.root,):
            with contextlib.suppress(FileExistsError):
                os.mkdir(directory, 0o700)

    def _scan(self) -> list[tuple[float, int, str]]:
        out: list[tuple[float, int, str]] = []
        try:
            subs = os.listdir(self.root)
        except OSError:
            return out
        for sub in subs:
            if len(sub) != 2:
                continue
            try:
                entries = os.scandir(os.path.join(self.root, sub))
            except OSError:
                continue
            with entries:
                for entry in entries:
                    try:
                        st = entry.stat(follow_symlinks=False)
                    except OSError:
                        continue
                    out.append((st.st_mtime, st.st_size, entry.path))
        return out

    def usage(self) -> int:
        """Bytes in the directory now (a scan; for tests and ``info``)."""
        return sum(size for _m, size, _p in self._scan())
