"""verify's pack reader: one thread, ``O_DIRECT``, a few reused huge-page buffers.

Its own module because it is the one piece of verify that owns a thread and
raw memory: its buffer lifetime rules (a buffer returns to the reader only
when its window's check is done) are easiest to hold when nothing else is
beside them.  Stores that are not a local directory (a bucket) get one
ranged GET per window instead, a few of them in flight at once
(:func:`_read_from_store`): a GET's latency is hidden behind the others'.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import mmap
import os
import queue
import threading
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor

from repofs.errors import IntegrityError
from repofs.maintenance.verify.windows import _Buffer, _Window
from repofs.store.packstore import LocalPackStore, PackStore
from repofs.util.directio import HUGE_PAGE, direct_buffer, read_into


class PackReader:
    """Reads windows of many packs in order on one thread, into a few reused aligned buffers.

    Yields ``(window, buffer, length)``, or ``(window, None, error)`` for a
    window that cannot be read; give each buffer back with :meth:`release`
    once nothing looks at it any more.  At most ``buffers`` windows are read
    ahead of the releases, which bounds memory and throttles the reader to
    the checkers' pace.

    Why not one :class:`repofs.util.directio.SequentialReader` per pack: each one
    maps and faults in a fresh buffer (shared memory, 8 MiB here) and copies
    every window out of it into new ``bytes``.  With 32 MiB packs that
    was 1.1-1.4 s of system time and 4.4-4.5 s of CPU for the 2 GiB
    benchmark, against 0.2-0.3 s and 3.0-3.4 s here: the buffers are mapped
    once per run, one thread reads across pack boundaries, and the
    checkers read straight from the buffers.  The reads themselves are the
    same: ``O_DIRECT`` (no page cache: no kernel page allocation, zero-fill
    and copy per byte, and the bytes checked are the disk's, not a cached
    copy), and the page cache for packs whose file system refuses it.
    """

    def __init__(self, store: LocalPackStore, windows: list[_Window], buffers: int) -> None:
        size = max((w.length for w in windows), default=0)
        size = max(HUGE_PAGE, -(-size // HUGE_PAGE) * HUGE_PAGE)
        self._buffers = [direct_buffer(size) for _ in range(buffers)]
        self._free: queue.SimpleQueue[mmap.mmap | None] = queue.SimpleQueue()
        for buf in self._buffers:
            self._free.put(buf)
        self._out: queue.SimpleQueue[tuple[_Window, mmap.mmap | None, int | str] | None] = (
            queue.SimpleQueue()
        )
        self._store = store
        self.windows = windows
        self._stop = threading.Event()
        self._crash: BaseException | None = None
        #: packs read with O_DIRECT and through the page cache (for tests and curiosity)
        self.direct_packs = 0
        self.buffered_packs = 0
        self._thread = threading.Thread(target=self._run, name="repofs-verify-read", daemon=True)
        self._thread.start()

    def __iter__(self) -> Iterator[tuple[_Window, mmap.mmap | None, int | str]]:
        while (item := self._out.get()) is not None:
            yield item
        if self._crash is not None:
            raise RuntimeError("verify's pack reader failed") from self._crash

    def release(self, buf: mmap.mmap) -> None:
        self._free.put(buf)

    def close(self) -> None:
        """Stop reading ahead and free the buffers; safe to call twice."""
        self._stop.set()
        self._free.put(None)  # wakes the reader if it waits for a buffer
        self._thread.join()
        for buf in self._buffers:
            with contextlib.suppress(BufferError):  # a view is still out: the GC frees it
                buf.close()

    def __enter__(self) -> PackReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _run(self) -> None:
        try:
            for pack_id, group in itertools.groupby(self.windows, key=lambda w: w.pack_id):
                if self._stop.is_set() or not self._read_pack(pack_id, list(group)):
                    return
        except BaseException as exc:  # a bug: must not end the stream as if all was read
            self._crash = exc
        finally:
            self._out.put(None)

    def _read_pack(self, pack_id: bytes, group: list[_Window]) -> bool:
        """Read one pack's windows; False when asked to stop."""
        name = pack_id.hex()
        path = self._store.path_of(pack_id)
        direct = True
        try:
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_DIRECT)
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                direct = False  # the file system refuses O_DIRECT
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                error = f"pack {name} is missing"
            else:
                error = f"pack {name}: cannot open: {exc.strerror}"
            for w in group:
                self._out.put((w, None, error))
            return True
        try:
            for w in group:
                buf = self._free.get()
                if buf is None or self._stop.is_set():
                    return False
                try:
                    try:
                        n = read_into(fd, buf, w.start, w.length, direct)
                    except OSError as exc:
                        if not direct or exc.errno != errno.EINVAL:
                            raise
                        # The file system took the open but not the read: the page cache then.
                        os.close(fd)
                        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
                        direct = False
                        n = read_into(fd, buf, w.start, w.length, direct)
                except OSError as exc:
                    self._free.put(buf)
                    error = f"pack {name}: read error at offset {w.start}: {exc.strerror}"
                    self._out.put((w, None, error))
                else:
                    self._out.put((w, buf, n))
        finally:
            os.close(fd)
            if direct:
                self.direct_packs += 1
            else:
                self.buffered_packs += 1
        return True


#: ranged GETs in flight at once when verify reads a bucket (each holds one window in memory)
STORE_READERS = 4


def _read_from_store(
    store: PackStore, windows: list[_Window], readers: int = 1
) -> Iterator[tuple[_Window, bytes | None, int | str]]:
    """Windows of a store that is not a local directory (a bucket): one ranged read each.

    ``readers`` reads run at once, in the windows' order, and at most that
    many windows wait for the caller: memory stays ``readers`` windows, and
    the requests' round trips overlap instead of adding up.
    """

    def read(w: _Window) -> tuple[bytes | None, int | str]:
        try:
            data = store.read(w.pack_id, w.start, w.length)
        except IntegrityError as exc:
            return None, str(exc)
        return data, len(data)

    if readers <= 1:
        for w in windows:
            data, n = read(w)
            yield w, data, n
        return
    with ThreadPoolExecutor(readers, thread_name_prefix="repofs-verify-get") as pool:
        pending: deque[tuple[_Window, Future[tuple[bytes | None, int | str]]]] = deque()
        it = iter(windows)
        try:
            for w in itertools.islice(it, readers):
                pending.append((w, pool.submit(read, w)))
            while pending:
                w, fut = pending.popleft()
                data, n = fut.result()
                nxt = next(it, None)
                if nxt is not None:
                    pending.append((nxt, pool.submit(read, nxt)))
                yield w, data, n
        finally:
            for _w, fut in pending:
                fut.cancel()


def _keep(buf: _Buffer) -> None:
    """Buffers of other stores are plain bytes: nothing to give back."""
