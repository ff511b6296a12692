"""Where pack files live, behind the smallest interface that an object store can also serve.

Packs are immutable once published: a :class:`PackStore` can write a new
pack, read a byte range of one, list them and delete one.  That is exactly
what S3-compatible object stores offer (PUT, ranged GET, LIST, DELETE), so a
``S3PackStore`` can replace :class:`LocalPackStore` without touching the
index, the ingest pipeline or the mount.
"""

from __future__ import annotations

import abc
import collections
import contextlib
import os
import threading
from collections.abc import Callable, Iterator

from repofs.errors import IntegrityError, RepositoryError
from repofs.store.durable import fsync_dir, make_dirs, os_error

PACK_ID_BYTES = 16


def new_pack_id() -> bytes:
    """Random ids: concurrent writers never collide and need no coordination."""
    return os.urandom(PACK_ID_BYTES)  # what secrets.token_bytes does, without its imports


class PackSink(abc.ABC):
    """A pack being written; invisible to every reader until :meth:`publish`."""

    pack_id: bytes

    @abc.abstractmethod
    def append(self, data: bytes) -> int:
        """Append ``data`` and return the offset it starts at."""

    @property
    @abc.abstractmethod
    def size(self) -> int: ...

    @abc.abstractmethod
    def publish(self) -> None:
        """Make the pack durable and visible under its id.  Returns only when durable."""

    @abc.abstractmethod
    def abort(self) -> None:
        """Throw the unfinished pack away."""


class PackStore(abc.ABC):
    #: How readers coalesce records of one pack into one read: through gaps up to
    #: READ_GAP bytes, at most READ_RUN bytes per read.  A local file's read costs a
    #: syscall; an object store's a round trip, which is worth reading more bytes to save.
    READ_GAP = 64 * 1024
    READ_RUN = 2 * 1024 * 1024
    #: Threads that load chunks ahead of readers; None: one per core (local reads are
    #: CPU-bound: decompressing and checking).  A store far away needs many reads in flight.
    READ_THREADS: int | None = None
    #: Bytes of chunks a sequential reader keeps loading ahead of itself.
    READ_AHEAD = 32 * 1024 * 1024
    #: Whether each read waits for a round trip: then a request's own missing chunks are
    #: fetched together (coalesced, in parallel) instead of one after the other.
    REMOTE = False

    @abc.abstractmethod
    def create(self) -> PackSink: ...

    @abc.abstractmethod
    def read(self, pack_id: bytes, offset: int, length: int) -> bytes:
        """Exactly ``length`` bytes or :class:`IntegrityError` (missing pack, short read)."""

    @abc.abstractmethod
    def size(self, pack_id: bytes) -> int: ...

    @abc.abstractmethod
    def list(self) -> Iterator[bytes]: ...

    @abc.abstractmethod
    def delete(self, pack_id: bytes) -> None: ...

    def forget(self, pack_id: bytes) -> None:
        """Drop whatever is held open for the pack, so the next read sees its current state."""
        return None

    def close(self) -> None:
        """Release what the store holds open."""
        return None

    def cleanup_unpublished(self, running: Callable[[int], bool] | None = None) -> int:
        """Remove unfinished packs of writers that died; ``running(pid)`` spares a live one's.

        Without ``running``, call it only when no writer runs.
        """
        return 0


class _LocalSink(PackSink):
    def __init__(self, store: LocalPackStore, pack_id: bytes) -> None:
        self.pack_id = pack_id
        self._store = store
        self._tmp = os.path.join(store.tmp_dir, f"{pack_id.hex()}.{os.getpid()}.tmp")
        try:
            self._fd = os.open(
                self._tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600
            )
        except OSError as exc:
            raise os_error(exc, f"creating pack in {store.tmp_dir}") from None
        self._size = 0

    @property
    def size(self) -> int:
        return self._size

    def append(self, data: bytes) -> int:
        offset = self._size
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self._fd, view) :]
        except OSError as exc:
            self.abort()
            raise os_error(exc, f"writing pack {self.pack_id.hex()}") from None
        self._size += len(data)
        return offset

    def publish(self) -> None:
        final = self._store.path_of(self.pack_id)
        try:
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = -1
            self._store.make_subdir(os.path.dirname(final))
            os.rename(self._tmp, final)
            fsync_dir(os.path.dirname(final))
        except OSError as exc:
            self.abort()
            raise os_error(exc, f"publishing pack {self.pack_id.hex()}") from None

    def abort(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        with contextlib.suppress(OSError):
            os.unlink(self._tmp)


class _Descriptor:
    """An open pack file and how many reads are using it right now."""

    __slots__ = ("fd", "retired", "users")

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.users = 0
        self.retired = False  # out of the cache: closed by whoever stops using it last


class LocalPackStore(PackStore):
    """Packs as files ``packs/<first two hex digits>/<32 hex digits>.pack``.

    Readers keep a small LRU of open file descriptors; a pack deleted by gc
    stays readable through a descriptor that is already open, which is what
    lets a concurrent mount finish a read it started.

    A descriptor is counted while a read uses it, and one that leaves the
    cache (eviction, :meth:`forget`, :meth:`close`) is closed only once its
    last read is done.  Closing it under a read let the number be reused
    by another thread's open of another pack, and the read returned that
    pack's bytes: about 1 read in 5,000 with 96 packs and 10 threads.
    """

    MAX_FDS = 64

    def __init__(self, root: str) -> None:
        self.root = root
        self.tmp_dir = os.path.join(root, "tmp")
        self._fds: collections.OrderedDict[bytes, _Descriptor] = collections.OrderedDict()
        self._lock = threading.Lock()
        self._durable_subdirs: set[str] = set()

    def path_of(self, pack_id: bytes) -> str:
        h = pack_id.hex()
        return os.path.join(self.root, h[:2], f"{h}.pack")

    def create(self) -> PackSink:
        return _LocalSink(self, new_pack_id())

    def make_subdir(self, path: str) -> None:
        """Create ``packs/XX`` if needed, and make its entry in ``packs/`` durable.

        Without it a power loss could take a whole ``packs/XX`` directory
        with it, packs the index already pointed into included: the packs
        themselves and ``packs/XX`` were fsynced, the entry leading to them
        was not.  Once per directory and process (at most 256 ``fsync``).
        """
        if path in self._durable_subdirs:
            return
        make_dirs(path)
        self._durable_subdirs.add(path)

    @contextlib.contextmanager
    def using(self, pack_id: bytes) -> Iterator[int]:
        """A descriptor of the pack, guaranteed open (and the same file) until the block ends."""
        desc = self._acquire(pack_id)
        try:
            yield desc.fd
        finally:
            with self._lock:
                desc.users -= 1
                close = desc.retired and desc.users == 0
            if close:
                os.close(desc.fd)

    def _acquire(self, pack_id: bytes) -> _Descriptor:
        with self._lock:
            desc = self._fds.get(pack_id)
            if desc is not None:
                self._fds.move_to_end(pack_id)
                desc.users += 1
                return desc
        try:
            fd = os.open(self.path_of(pack_id), os.O_RDONLY | os.O_CLOEXEC)
        except (FileNotFoundError, NotADirectoryError):
            raise IntegrityError(f"pack {pack_id.hex()} is missing") from None
        except OSError as exc:
            raise IntegrityError(f"pack {pack_id.hex()}: cannot open: {exc.strerror}") from None
        idle: list[int] = []
        with self._lock:
            desc = self._fds.get(pack_id)
            if desc is not None:  # another thread opened it meanwhile: use theirs
                idle.append(fd)
            else:
                desc = self._fds[pack_id] = _Descriptor(fd)
                while len(self._fds) > self.MAX_FDS:
                    _, victim = self._fds.popitem(last=False)
                    idle += self._retire(victim)
            self._fds.move_to_end(pack_id)
            desc.users += 1
        for old in idle:
            os.close(old)
        return desc

    @staticmethod
    def _retire(desc: _Descriptor) -> list[int]:
        """Take ``desc`` out of use; the descriptor to close now, or none if a read still uses it.

        Called under the lock; the caller closes outside it.
        """
        desc.retired = True
        return [desc.fd] if desc.users == 0 else []

    def forget(self, pack_id: bytes) -> None:
        """Drop a cached descriptor so the next read sees the pack's current state."""
        with self._lock:
            desc = self._fds.pop(pack_id, None)
            idle = self._retire(desc) if desc is not None else []
        for fd in idle:
            os.close(fd)

    def read(self, pack_id: bytes, offset: int, length: int) -> bytes:
        with self.using(pack_id) as fd:
            try:
                data = os.pread(fd, length, offset)
            except OSError as exc:
                raise IntegrityError(
                    f"pack {pack_id.hex()}: read error at offset {offset}: {exc.strerror}"
                ) from None
        if len(data) != length:
            raise IntegrityError(
                f"pack {pack_id.hex()}: truncated: {len(data)} of {length} bytes at offset {offset}"
            )
        return data

    def size(self, pack_id: bytes) -> int:
        try:
            return os.stat(self.path_of(pack_id)).st_size
        except (FileNotFoundError, NotADirectoryError):
            raise IntegrityError(f"pack {pack_id.hex()} is missing") from None
        except OSError as exc:
            raise IntegrityError(f"pack {pack_id.hex()}: cannot stat: {exc.strerror}") from None

    def list(self) -> Iterator[bytes]:
        try:
            subdirs = sorted(os.listdir(self.root))
        except FileNotFoundError:
            return
        except OSError as exc:  # packs/ replaced by a file, or unreadable
            raise RepositoryError(f"{self.root}: cannot list the packs: {exc.strerror}") from None
        for sub in subdirs:
            if len(sub) != 2:
                continue
            try:
                names = sorted(os.listdir(os.path.join(self.root, sub)))
            except NotADirectoryError:
                continue  # not ours
            except OSError as exc:
                raise RepositoryError(
                    f"{os.path.join(self.root, sub)}: cannot list the packs: {exc.strerror}"
                ) from None
            for name in names:
                if name.endswith(".pack") and len(name) == 37:
                    try:
                        yield bytes.fromhex(name[:32])
                    except ValueError:
                        continue

    def delete(self, pack_id: bytes) -> None:
        self.forget(pack_id)
        path = self.path_of(pack_id)
        try:
            os.unlink(path)
        except FileNotFoundError:
            return
        fsync_dir(os.path.dirname(path))

    def cleanup_unpublished(self, running: Callable[[int], bool] | None = None) -> int:
        removed = 0
        try:
            names = os.listdir(self.tmp_dir)
        except FileNotFoundError:
            return 0
        for name in names:
            if running is not None and _writer_runs(name, running):
                continue  # a running writer's pack being filled
            path = os.path.join(self.tmp_dir, name)
            try:
                removed += os.stat(path).st_size
                os.unlink(path)
            except OSError:
                continue
        return removed

    def close(self) -> None:
        """Close every cached descriptor; those a read still uses close when it ends."""
        with self._lock:
            idle = [fd for desc in self._fds.values() for fd in self._retire(desc)]
            self._fds.clear()
        for fd in idle:
            os.close(fd)


def _writer_runs(name: str, running: Callable[[int], bool]) -> bool:
    """Whether a temporary pack (``<pack id>.<pid>.tmp``, see ``_LocalSink``) is a live writer's."""
    parts = name.split(".")
    with contextlib.suppress(ValueError, IndexError):
        if len(parts) >= 3 and running(int(parts[-2])):
            return True
    return False
