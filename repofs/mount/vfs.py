"""What the mounted tree looks like, as a plain model with no FUSE in it.

Layout::

    /<vm>/                      one directory per VM
    /<vm>/latest                symlink to the newest restore point
    /<vm>/<rp-id>/              one directory per restore point
    /<vm>/<rp-id>/<disk>.vmdk        monolithicFlat descriptor
    /<vm>/<rp-id>/<disk>-flat.vmdk   the raw disk bytes
    /<vm>/<rp-id>/<config file>      attached VM configuration files

Inode numbers are derived from sequence numbers stored in the index, never
from the order of a listing, so they are the same after every remount:
``seq << 16`` names a VM or restore point directory, and the low 16 bits a
slot inside it (1 = ``latest``; 2+2i and 3+2i = descriptor and flat file of
disk i; then the config files).
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import stat
import threading
import time
from dataclasses import dataclass

from repofs.errors import IntegrityError, RepositoryError
from repofs.mount.descriptor import descriptor_text
from repofs.read.diskread import ChunkCache, DiskReader, Prefetcher
from repofs.store.records import RecordType
from repofs.store.repository import Repository
from repofs.store.restorepoint import RestorePoint
from repofs.store.schema import SeqTarget

ROOT_INODE = 1
SLOT_BITS = 16
SLOT_LATEST = 1
log = logging.getLogger("repofs.mount.vfs")


def split_ino(ino: int) -> tuple[int, int]:
    """An inode number's (restore point sequence, slot) halves."""
    return ino >> SLOT_BITS, ino & ((1 << SLOT_BITS) - 1)


class NotFound(Exception):
    """No such entry (ENOENT)."""


@dataclass(frozen=True)
class Attr:
    ino: int
    mode: int
    size: int
    mtime: float
    blocks: int = 0
    nlink: int = 1
    immutable: bool = False  # may the kernel cache it forever?

    @classmethod
    def frozen_file(cls, ino: int, size: int, mtime: float, allocated: int | None = None) -> Attr:
        """A read-only file of a restore point: it never changes, so the kernel may cache it.

        ``allocated`` (default: all of ``size``) gives ``st_blocks``, which is what ``du``
        and sparse-aware copies look at for a disk.
        """
        used = size if allocated is None else allocated
        return cls(
            ino, stat.S_IFREG | 0o444, size, mtime, blocks=(used + 511) // 512, immutable=True
        )


@dataclass(frozen=True)
class _Rp:
    rp: RestorePoint
    names: dict[str, int]  # file name -> slot


WARM_MAP_PAGES = 1024  # 32 MiB of references: the whole map of a disk up to 64 GiB
CACHE_FLUSH_SECONDS = 5.0  # at unmount: the longest wait for the disk cache's last records
INDEX_CHECK_INTERVAL = 1.0  # seconds between looks for an index that rebuild-index replaced


class RepoView:
    """The tree of a repository; every method may block and is thread-safe."""

    def __init__(self, repo: Repository, cache_bytes: int = 256 * 1024 * 1024) -> None:
        self.repo = repo
        repo.use_record_cache()  # a bucket's records also on this host's disk
        self.cache = ChunkCache(repo, cache_bytes)
        threads = repo.packs.READ_THREADS or max(2, os.cpu_count() or 2)
        self.prefetcher = Prefetcher(self.cache, threads=threads)
        self._rps: collections.OrderedDict[int, _Rp] = collections.OrderedDict()
        self._readers: collections.OrderedDict[tuple[int, int], DiskReader] = (
            collections.OrderedDict()
        )
        self._lock = threading.Lock()
        self._to_warm: set[int] = set()  # opened disks whose map loads after their first read
        self._logged: set[str] = set()
        self._index_checked = time.monotonic()
        self.root_mtime = os.stat(os.path.join(repo.path, "config.json")).st_mtime

    # -- following the index -----------------------------------------------------------

    def _follow_index(self, now: bool = False) -> bool:
        """Switch to the index rebuild-index put in place, if it did; True if we switched.

        The mount reads the index without the repository lock, so a
        rebuild can replace it under us: without this, the tree would never
        show a restore point committed after the rebuild, and reads would
        fail once a gc on the new index moved their chunks.  Tree
        operations look once a second (a ``stat``); a read that fails looks
        at once (``now``) and is retried.  Everything cached is
        content-addressed (chunks, map pages) and stays valid, except the
        restore points and open disks, which are looked up again.
        """
        if not now:
            t = time.monotonic()
            if t - self._index_checked < INDEX_CHECK_INTERVAL:
                return False
            self._index_checked = t
        try:
            switched = self.repo.index.follow_replacement()
        except RepositoryError as exc:  # a replacement that does not open: keep the old one
            message = f"the index was replaced but cannot be opened ({exc}); keeping the old one"
            self._log_once(message, message)
            return False
        if switched:
            with self._lock:
                self._rps.clear()
                self._readers.clear()
            log.warning("the index was replaced (rebuild-index): reading the new one")
        return switched

    def _log_once(self, key: str, message: str) -> None:
        """Log ``message`` the first time ``key`` (the problem, not the request) comes up."""
        with self._lock:
            if key in self._logged:
                return
            self._logged.add(key)
        log.error("%s", message)

    # -- resolving inodes ------------------------------------------------------------

    def _seq_target(self, seq: int) -> SeqTarget | None:
        idx = self.repo.index
        return idx.read(lambda t: idx.lookup_seq(t, seq))

    def _rp_by_seq(self, seq: int) -> _Rp:
        with self._lock:
            hit = self._rps.get(seq)
            if hit is not None:
                self._rps.move_to_end(seq)
                return hit
        target = self._seq_target(seq)
        if target is None or target.rp_id is None:
            raise NotFound(seq)
        vm, rp_id = target.vm, target.rp_id
        rp = self.repo.get_rp(vm, rp_id)
        if rp is None:
            raise NotFound(seq)
        names = {}
        for i, d in enumerate(rp.disks):
            names[f"{d.name}.vmdk"] = 2 + 2 * i
            names[f"{d.name}-flat.vmdk"] = 3 + 2 * i
        for j, c in enumerate(rp.configs):
            names[c.name] = 2 + 2 * len(rp.disks) + j
        entry = _Rp(rp, names)
        with self._lock:
            self._rps[seq] = entry
            while len(self._rps) > 4096:
                self._rps.popitem(last=False)
        return entry

    def _vm_by_seq(self, seq: int) -> str:
        target = self._seq_target(seq)
        if target is None or target.rp_id is not None:
            raise NotFound(seq)
        vm = target.vm
        if self._latest(vm) is None:
            raise NotFound(seq)
        return vm

    def _latest(self, vm: str) -> str | None:
        idx = self.repo.index
        return idx.read(lambda t: idx.latest_rp_id(t, vm))

    # -- attributes ------------------------------------------------------------------

    def getattr(self, ino: int) -> Attr:
        self._follow_index()
        if ino == ROOT_INODE:
            return Attr(ino, stat.S_IFDIR | 0o555, 0, self.root_mtime)
        seq, slot = split_ino(ino)
        target = self._seq_target(seq)
        if target is None:
            raise NotFound(ino)
        if target.rp_id is None:
            vm = target.vm
            latest = self._latest(vm)
            if latest is None or slot > SLOT_LATEST:
                raise NotFound(ino)
            latest_rp = self.repo.get_rp(vm, latest)
            mtime = latest_rp.created if latest_rp else self.root_mtime
            if slot == SLOT_LATEST:
                return Attr(ino, stat.S_IFLNK | 0o777, len(latest), mtime)
            return Attr(ino, stat.S_IFDIR | 0o555, 0, mtime)
        entry = self._rp_by_seq(seq)
        rp = entry.rp
        if slot == 0:
            return Attr(ino, stat.S_IFDIR | 0o555, 0, rp.created, nlink=2, immutable=True)
        nd = len(rp.disks)
        if 2 <= slot < 2 + 2 * nd:
            disk = rp.disks[(slot - 2) // 2]
            if slot % 2 == 0:
                size = len(descriptor_text(rp.vm, rp.id, disk.name, disk.capacity))
                return Attr.frozen_file(ino, size, rp.created)
            return Attr.frozen_file(ino, disk.capacity, rp.created, disk.allocated_bytes)
        j = slot - 2 - 2 * nd
        if 0 <= j < len(rp.configs):
            return Attr.frozen_file(ino, rp.configs[j].size, rp.created)
        raise NotFound(ino)

    # -- directories -----------------------------------------------------------------

    def lookup(self, parent: int, name: str) -> Attr:
        self._follow_index()
        if parent == ROOT_INODE:
            idx = self.repo.index
            seq = idx.read(lambda t: idx.vm_seq(t, name))
            if seq is None or self._latest(name) is None:
                raise NotFound(name)
            return self.getattr(seq << SLOT_BITS)
        seq, slot = split_ino(parent)
        if slot != 0:
            raise NotFound(name)
        target = self._seq_target(seq)
        if target is None:
            raise NotFound(name)
        if target.rp_id is None:
            vm = target.vm
            if name == "latest":
                if self._latest(vm) is None:
                    raise NotFound(name)
                return self.getattr((seq << SLOT_BITS) | SLOT_LATEST)
            rp = self.repo.get_rp(vm, name)
            if rp is None:
                raise NotFound(name)
            return self.getattr(rp.seq << SLOT_BITS)
        entry = self._rp_by_seq(seq)
        slot = entry.names.get(name)
        if slot is None:
            raise NotFound(name)
        return self.getattr((seq << SLOT_BITS) | slot)

    def listdir(self, ino: int) -> list[tuple[str, Attr]]:
        self._follow_index()
        idx = self.repo.index
        if ino == ROOT_INODE:

            def vms(txn: object) -> list[tuple[str, int]]:
                return [
                    (vm, idx.vm_seq(txn, vm))  # type: ignore[arg-type]
                    for vm in idx.vm_names(txn)
                ]

            return [(vm, self.getattr(seq << SLOT_BITS)) for vm, seq in idx.read(vms)]
        seq, slot = split_ino(ino)
        target = self._seq_target(seq)
        if slot != 0 or target is None:
            raise NotFound(ino)
        if target.rp_id is None:
            vm = target.vm
            docs = idx.read(lambda t: list(idx.rp_docs(t, vm)))
            if not docs:
                raise NotFound(ino)
            out = [
                (
                    d["id"],
                    Attr(
                        d["seq"] << SLOT_BITS,
                        stat.S_IFDIR | 0o555,
                        0,
                        d["created"],
                        nlink=2,
                        immutable=True,
                    ),
                )
                for d in docs
            ]
            out.append(
                (
                    "latest",
                    Attr(
                        (seq << SLOT_BITS) | SLOT_LATEST,
                        stat.S_IFLNK | 0o777,
                        len(docs[-1]["id"]),
                        docs[-1]["created"],
                    ),
                )
            )
            return out
        entry = self._rp_by_seq(seq)
        return [(name, self.getattr((seq << SLOT_BITS) | s)) for name, s in entry.names.items()]

    def dot_entries(self, ino: int) -> list[tuple[str, Attr]]:
        """``.`` and ``..`` of a directory, which readdir lists first like any file system's."""
        parent = self.getattr(ROOT_INODE)  # of the root and of a VM's directory
        if ino != ROOT_INODE:
            seq, _slot = split_ino(ino)
            target = self._seq_target(seq)
            if target is None:
                raise NotFound(ino)
            if target.rp_id is not None:  # a restore point's: its VM's directory
                parent = self.lookup(ROOT_INODE, self._rp_by_seq(seq).rp.vm)
        return [(".", self.getattr(ino)), ("..", parent)]

    def readlink(self, ino: int) -> str:
        seq, slot = split_ino(ino)
        if slot != SLOT_LATEST:
            raise NotFound(ino)
        vm = self._vm_by_seq(seq)
        latest = self._latest(vm)
        if latest is None:
            raise NotFound(ino)
        return latest

    # -- file contents ---------------------------------------------------------------

    def is_file(self, ino: int) -> bool:
        return stat.S_ISREG(self.getattr(ino).mode)

    def read(self, ino: int, offset: int, size: int) -> bytes:
        """File bytes, or :class:`IntegrityError` (logged once per problem) for damaged data.

        An object store that cannot be reached (after the bucket's own
        retries) is reported the same way: EIO for the read, one log line.
        """
        generation = self.repo.index.generation
        try:
            return self._read(ino, offset, size)
        except IntegrityError as exc:
            error = exc
        except RepositoryError as exc:  # the S3 endpoint down: no retry here, it had its own
            error = IntegrityError(str(exc))
            self._log_once(
                str(error),
                f"I/O error reading {self._file_name(ino)} bytes {offset}-{offset + size}: {error}",
            )
            raise error from None
        self._follow_index(now=True)
        # Retried if the index was replaced since this read began, by us or by a concurrent
        # request (the kernel splits a large read): its chunks may have moved.
        if self.repo.index.generation != generation:
            try:
                return self._read(ino, offset, size)
            except IntegrityError as exc:
                error = exc
        self._log_once(
            str(error),
            f"I/O error reading {self._file_name(ino)} bytes {offset}-{offset + size}: {error}",
        )
        raise error

    def _file_name(self, ino: int) -> str:
        """``vm/id/disk-flat.vmdk`` (or ``vm/id``) for log lines; the inode if that is gone."""
        seq, slot = split_ino(ino)
        try:
            rp = self._rp_by_seq(seq).rp
        except NotFound:
            return f"inode {ino}"
        if 2 <= slot < 2 + 2 * len(rp.disks):
            return f"{rp.vm}/{rp.id}/{rp.disks[(slot - 2) // 2].name}-flat.vmdk"
        return f"{rp.vm}/{rp.id}"

    def _read(self, ino: int, offset: int, size: int) -> bytes:
        seq, slot = split_ino(ino)
        entry = self._rp_by_seq(seq)
        rp = entry.rp
        nd = len(rp.disks)
        if 2 <= slot < 2 + 2 * nd:
            disk = rp.disks[(slot - 2) // 2]
            if slot % 2 == 0:
                return descriptor_text(rp.vm, rp.id, disk.name, disk.capacity)[
                    offset : offset + size
                ]
            data = self._reader(seq, slot, rp).read(offset, size)
            self._warm_after_read(ino)
            return data
        j = slot - 2 - 2 * nd
        if 0 <= j < len(rp.configs):
            cfg = rp.configs[j]
            blob = self.repo.read_object(RecordType.BLOB, bytes.fromhex(cfg.digest))
            if len(blob) != cfg.size:  # the file's size says more (or less): never a short read
                raise IntegrityError(
                    f"config file {cfg.name}: the record says {cfg.size} bytes, "
                    f"its blob has {len(blob)}"
                )
            return blob[offset : offset + size]
        raise NotFound(ino)

    def warm(self, ino: int) -> None:
        """Load an opened disk's map in the background once its first read is answered.

        Never blocks, never raises.  Waiting for the first read keeps the
        warm-up from competing with it: started at open, it tripled the
        first byte's latency (3.6 -> 8.2 ms in the benchmark).
        """
        with self._lock:
            self._to_warm.add(ino)

    def _warm_after_read(self, ino: int) -> None:
        with self._lock:
            if ino not in self._to_warm:
                return
            self._to_warm.discard(ino)
        self.prefetcher.submit(self._warm, ino)

    def _warm(self, ino: int) -> None:
        seq, slot = split_ino(ino)
        with contextlib.suppress(Exception):  # a read of the same range reports any damage
            rp = self._rp_by_seq(seq).rp
            if 3 <= slot < 2 + 2 * len(rp.disks) and slot % 2 == 1:
                self._reader(seq, slot, rp).warm_map(WARM_MAP_PAGES)

    def read_cached(self, ino: int, offset: int, size: int) -> bytes | None:
        """:meth:`read` of a disk already open, from memory only; None if that needs the disk.

        Safe to call on the event loop: it takes no I/O and never raises.
        """
        with self._lock:
            reader = self._readers.get(split_ino(ino))
        return None if reader is None else reader.read_cached(offset, size)

    def close(self) -> None:
        self.prefetcher.close()
        records = self.repo.records
        if records is not None:
            records.flush(CACHE_FLUSH_SECONDS)  # what was read, kept for the next mount
            log.info(
                "disk chunk cache: %d hits, %d misses, %d evicted, %d not kept (writer behind)",
                records.hits,
                records.misses,
                records.evicted,
                records.dropped,
            )

    def _reader(self, seq: int, slot: int, rp: RestorePoint) -> DiskReader:
        key = (seq, slot)
        with self._lock:
            reader = self._readers.get(key)
            if reader is not None:
                self._readers.move_to_end(key)
                return reader
        reader = DiskReader(self.repo, rp.disks[(slot - 2) // 2], self.cache, self.prefetcher)
        with self._lock:
            self._readers[key] = reader
            while len(self._readers) > 256:
                self._readers.popitem(last=False)
        return reader
