"""The LMDB environment of the index: opening, transactions, map growth and padding.

What the keys and values are is :mod:`repofs.store.schema`'s business; this
module keeps LMDB itself in check (a map that grows on demand, a file that
never ends in a page LMDB could run past, an index replaced by
rebuild-index) and offers typed reads and writes built on the schema.

In an encrypted repository (:attr:`Index.names` is a
:class:`~repofs.store.crypto.SealedKeys`) no name is in clear: the VM part of
the ``vms``, ``rps`` and ``reservations`` keys is a keyed digest of the VM
name (32 bytes), and the values of ``rps`` and ``seqs`` are sealed, bound to
their database and key.  Object keys are keyed digests already.  Restore
point ids (UTC times) and sequence numbers stay in clear.
"""

from __future__ import annotations

import contextlib
import errno
import os
import resource
import struct
import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import lmdb

from repofs.errors import IndexAccessError, RepositoryError
from repofs.store.crypto import PLAIN, Keys
from repofs.store.durable import free_bytes, fsync_dir, os_error
from repofs.store.records import RecordType
from repofs.store.schema import (
    DATABASES,
    GC_GENERATION_KEY,
    SEQ_KEY,
    Location,
    SeqTarget,
    decode_condemned,
    decode_location,
    decode_rp,
    decode_seq_target,
    decode_u64,
    encode_location,
    encode_pack_info,
    encode_rp,
    encode_u64,
    object_key,
    seq_key,
    seq_target_rp,
    seq_target_vm,
)

T = TypeVar("T")
DEFAULT_MAP_SIZE = 1 << 36  # 64 GiB of address space; grows on demand
#: What LMDB says when a write walks into a damaged page (nothing is written then).
DAMAGE_ERRORS = (lmdb.CorruptedError, lmdb.PageNotFoundError, lmdb.PageFullError)
TAIL_PADDING = 1 << 20  # sparse zeros after data.mdb's last page, see Index._pad_tail
NEARLY_FULL_BYTES = 1 << 20  # under this, a failed index write is taken for a full disk
CREATE_ROOM_BYTES = 256 * 1024  # LMDB's new files need a few pages; QA saw SIGBUS at 4 KiB
MAP_SIZE_ENV = "REPOFS_LMDB_MAP_SIZE"  # tests set a tiny initial map to exercise growth


class Index:
    """A thin typed layer over the LMDB environment.

    Read methods open a short read transaction in the calling thread, so they
    are safe from any thread and always see the latest commit: that is how a
    mounted tree shows a new restore point without a remount.
    """

    def __init__(self, path: str, *, create: bool = False, map_size: int | None = None) -> None:
        self.path = path
        if map_size is None:
            map_size = _address_space_share(int(os.environ.get(MAP_SIZE_ENV) or DEFAULT_MAP_SIZE))
        self._resize = _ResizeGate()
        self._map_size = map_size
        self.env, self.dbs = self._open_env(create)
        if create:
            self._sync_entries()
        self._identity = self._file_identity()
        self._pad_tail()
        self.generation = 0  #: how many times :meth:`follow_replacement` reopened it
        #: How names are kept: in clear, or keyed and sealed (an encrypted repository).
        self.names: Keys = PLAIN

    def _open_env(self, create: bool) -> tuple[lmdb.Environment, dict[str, Any]]:
        if not create:
            _check_openable(self.path)
        _check_room(self.path, create)
        try:
            env = lmdb.open(
                self.path,
                subdir=True,
                map_size=self._map_size,
                max_dbs=len(DATABASES) + 2,
                max_readers=512,
                mode=0o600,
                readahead=False,
                # Zero the unused part of every page written: without it, LMDB writes
                # whatever its malloc'd buffers held before (chunk data, restore point
                # JSON in clear), which an encrypted repository must never store.
                meminit=True,
                create=create,
            )
        except lmdb.Error as exc:
            raise _open_error(self.path, exc) from None
        try:
            return env, {name: env.open_db(name.encode()) for name in DATABASES}
        except lmdb.Error as exc:
            env.close()
            raise _open_error(self.path, exc) from None

    def _sync_entries(self) -> None:
        """Make ``data.mdb``'s entry in the index directory durable; LMDB syncs only its content.

        Without it a power loss after ``init``, or after rebuild-index swapped
        its new directory in, could leave the index directory empty while
        everything written through it had been reported durable.
        """
        try:
            fsync_dir(self.path)
        except OSError as exc:
            self.env.close()
            raise os_error(exc, self.path) from None

    def follow_replacement(self) -> bool:
        """Reopen the index if rebuild-index has replaced it since we opened it; True if so.

        For readers that keep the index open without the repository lock
        (the mount): rebuild-index swaps in a new directory, and the old
        environment then goes on showing the old file, which knows no
        restore point committed since and points into packs that a gc on
        the new index deletes.  Waits for this process's open transactions
        (the map-resize gate), so no thread reads through a closed
        environment.  A replacement that does not open (half there, damaged)
        raises the open error and leaves the old environment in use.
        """
        identity = self._file_identity()
        if identity is None or identity == self._identity:
            return False
        with self._resize.exclusive():
            identity = self._file_identity()
            if identity is None or identity == self._identity:
                return False
            env, dbs = self._open_env(create=False)
            old, self.env, self.dbs, self._identity = self.env, env, dbs, identity
            self.generation += 1
            old.close()
        return True

    def is_empty(self) -> bool:
        """True if no pack is indexed or condemned: a new repository, or an index that lost it all.

        Condemned packs count: gc may condemn every pack there is (the only
        ingest is still running), and the index has not lost them.
        """
        return self.read(
            lambda txn: all(txn.stat(self.dbs[db])["entries"] == 0 for db in ("packs", "doomed"))
        )

    def warm(self, budget: int) -> bool:
        """Ask the kernel to read the whole index into the page cache, if it is under ``budget``.

        The environment is opened without readahead (right for random
        lookups in a large index), so after a cold start every lookup of a
        mount's first reads would wait for a few B-tree pages from disk.
        A small index is cheaper read once, in the background.
        """
        try:
            fd = os.open(os.path.join(self.path, "data.mdb"), os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return False
        try:
            if os.fstat(fd).st_size > budget:
                return False
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
            return True
        finally:
            os.close(fd)

    def _file_identity(self) -> tuple[int, int] | None:
        try:
            st = os.stat(os.path.join(self.path, "data.mdb"))
        except OSError:
            return None
        return st.st_dev, st.st_ino

    def check_current(self) -> None:
        """Refuse to act on an index that rebuild-index has replaced since we opened it."""
        self._check_current()

    def _check_current(self) -> None:
        """Refuse to write into an index that rebuild-index has replaced since we opened it."""
        if self._file_identity() != self._identity:
            raise RepositoryError(
                f"{self.path}: the index was replaced (by rebuild-index) while "
                "this command had it open; run the command again"
            )

    def close(self) -> None:
        self.env.close()

    # -- transactions ---------------------------------------------------------

    def read(self, fn: Callable[[lmdb.Transaction], T]) -> T:
        with self.reading() as txn:
            return fn(txn)

    @contextlib.contextmanager
    def reading(self) -> Iterator[lmdb.Transaction]:
        """A read transaction, also for callers that keep one open over many lookups."""
        while True:
            with self._resize.shared():
                try:
                    txn = self.env.begin(buffers=False)
                except lmdb.MapResizedError:
                    txn = None
                if txn is not None:
                    try:
                        yield txn
                    finally:
                        txn.abort()
                    return
            self._set_mapsize(0)  # adopt the size another process grew it to

    def write(self, fn: Callable[[lmdb.Transaction], T]) -> T:
        """Run ``fn`` in one write transaction, growing the map when it fills up."""
        self._check_current()
        while True:
            try:
                with self._resize.shared(), self.env.begin(write=True) as txn:
                    result = fn(txn)
                self._pad_tail()
                return result
            except lmdb.MapFullError:
                self._set_mapsize(self.env.info()["map_size"] * 2)
            except lmdb.MapResizedError:
                self._set_mapsize(0)
            except lmdb.Error as exc:
                # LMDB reports a short write (a disk that filled up meanwhile) as EIO.
                free = free_bytes(self.path)
                if "No space" in str(exc) or (free is not None and free < NEARLY_FULL_BYTES):
                    raise os_error(OSError(errno.ENOSPC, "No space"), self.path) from None
                if isinstance(exc, DAMAGE_ERRORS):
                    raise RepositoryError(
                        f"{self.path}: the index is damaged ({exc}); run 'repofs rebuild-index'"
                    ) from None
                raise RepositoryError(f"{self.path}: cannot write the index: {exc}") from None

    def _pad_tail(self) -> None:
        """Keep :data:`TAIL_PADDING` zero bytes (sparse) past the last page of ``data.mdb``.

        A damaged page can send LMDB up to 128 KiB past itself (a node
        offset and a key length of 64 KiB each).  Past the end of the file
        that is SIGBUS: ingest died without an error line.  Within the
        padding LMDB reads zeros and reports the damage.  Done under LMDB's
        writer lock (an empty write transaction), so no other process is
        extending the file meanwhile, which a late ``ftruncate`` would cut.
        Never raises: the padding is a safety margin, not something a
        command must have (a read-only repository goes without).
        """
        try:
            with self._resize.shared():
                txn = self.env.begin(write=True)
                try:
                    want = (self.env.info()["last_pgno"] + 1) * self.env.stat()["psize"]
                    with open(os.path.join(self.path, "data.mdb"), "r+b") as f:
                        if os.fstat(f.fileno()).st_size < want + TAIL_PADDING:
                            os.ftruncate(f.fileno(), want + TAIL_PADDING)
                finally:
                    txn.abort()
        except (OSError, lmdb.Error):
            return

    def _set_mapsize(self, size: int) -> None:
        """Grow (or adopt) the map; LMDB requires that no transaction of this process is open."""
        with self._resize.exclusive():
            self.env.set_mapsize(size)

    def get(self, txn: lmdb.Transaction, db: str, key: bytes) -> bytes | None:
        return txn.get(key, db=self.dbs[db])

    def put(self, txn: lmdb.Transaction, db: str, key: bytes, value: bytes) -> None:
        txn.put(key, value, db=self.dbs[db])

    def delete(self, txn: lmdb.Transaction, db: str, key: bytes) -> None:
        txn.delete(key, db=self.dbs[db])

    def items(
        self, txn: lmdb.Transaction, db: str, prefix: bytes = b""
    ) -> Iterator[tuple[bytes, bytes]]:
        with txn.cursor(db=self.dbs[db]) as cur:
            if not cur.set_range(prefix):
                return
            for key, value in cur:
                if not key.startswith(prefix):
                    return
                yield key, value

    # -- objects --------------------------------------------------------------

    def locate(
        self, rtype: RecordType, digest: bytes, txn: lmdb.Transaction | None = None
    ) -> Location | None:
        return self._locate_in("objects", decode_location, rtype, digest, txn)

    def locate_all(self, rtype: RecordType, digests: list[bytes]) -> list[Location | None]:
        """:meth:`locate` of many objects in one read transaction."""
        with self.reading() as txn:
            return [self.locate(rtype, d, txn) for d in digests]

    def has(self, txn: lmdb.Transaction, rtype: RecordType, digest: bytes) -> bool:
        """Positions a cursor and never touches the value.

        ``txn.get`` copies the value, and a damaged leaf can claim a value of
        gigabytes: a copy that long runs past the end of the file, far past
        the padding that :meth:`_pad_tail` keeps there, and dies of SIGBUS.
        """
        with txn.cursor(db=self.dbs["objects"]) as cursor:
            return cursor.set_key(object_key(rtype, digest))

    def add_pack(
        self,
        txn: lmdb.Transaction,
        pack_id: bytes,
        size: int,
        entries: list[tuple[RecordType, bytes, int, int, int]],
    ) -> None:
        """Index a published pack: ``entries`` are (type, digest, offset, stored, raw)."""
        objects = self.dbs["objects"]
        for rtype, digest, offset, stored, raw in entries:
            txn.put(
                object_key(rtype, digest), encode_location(pack_id, offset, stored, raw), db=objects
            )
        txn.put(pack_id, encode_pack_info(size, len(entries)), db=self.dbs["packs"])

    def locate_condemned(
        self, rtype: RecordType, digest: bytes, txn: lmdb.Transaction | None = None
    ) -> Location | None:
        """Where a condemned object lay: its pack exists while a writer that could use it runs."""
        return self._locate_in("condemned", lambda v: decode_condemned(v)[0], rtype, digest, txn)

    def _locate_in(
        self,
        db: str,
        decode: Callable[[bytes], Location],
        rtype: RecordType,
        digest: bytes,
        txn: lmdb.Transaction | None,
    ) -> Location | None:
        if txn is None:
            return self.read(lambda t: self._locate_in(db, decode, rtype, digest, t))
        value = txn.get(object_key(rtype, digest), db=self.dbs[db])
        return decode(value) if value is not None else None

    # -- gc generations ------------------------------------------------------

    def gc_generation(self, txn: lmdb.Transaction) -> int:
        return decode_u64(txn.get(GC_GENERATION_KEY, db=self.dbs["meta"]))

    def set_gc_generation(self, txn: lmdb.Transaction, gen: int) -> None:
        txn.put(GC_GENERATION_KEY, encode_u64(gen), db=self.dbs["meta"])

    # -- sequence numbers ----------------------------------------------------

    def next_seq(self, txn: lmdb.Transaction) -> int:
        seq = decode_u64(txn.get(SEQ_KEY, db=self.dbs["meta"]), default=1)
        txn.put(SEQ_KEY, encode_u64(seq + 1), db=self.dbs["meta"])
        return seq

    def bump_seq(self, txn: lmdb.Transaction, at_least: int) -> None:
        current = decode_u64(txn.get(SEQ_KEY, db=self.dbs["meta"]), default=1)
        if at_least > current:
            txn.put(SEQ_KEY, encode_u64(at_least), db=self.dbs["meta"])

    def vm_seq(self, txn: lmdb.Transaction, vm: str, *, allocate: bool = False) -> int | None:
        raw = txn.get(self.names.vm_key(vm), db=self.dbs["vms"])
        if raw is not None:
            return decode_u64(raw)
        if not allocate:
            return None
        seq = self.next_seq(txn)
        self.set_vm_seq(txn, vm, seq)
        return seq

    def set_vm_seq(self, txn: lmdb.Transaction, vm: str, seq: int) -> None:
        txn.put(self.names.vm_key(vm), encode_u64(seq), db=self.dbs["vms"])
        self._put_seq(txn, seq, seq_target_vm(vm))

    def _put_seq(self, txn: lmdb.Transaction, seq: int, target: bytes) -> None:
        key = seq_key(seq)
        txn.put(key, self.names.seal_value("seqs", key, target), db=self.dbs["seqs"])

    def lookup_seq(self, txn: lmdb.Transaction, seq: int) -> SeqTarget | None:
        """What ``seq`` names (opened, when the repository seals its ``seqs`` values)."""
        key = seq_key(seq)
        raw = txn.get(key, db=self.dbs["seqs"])
        return decode_seq_target(self.names.open_value("seqs", key, raw)) if raw else None

    # -- restore points ------------------------------------------------------

    def rp_key(self, vm: str, rp_id: str) -> bytes:
        """The ``rps`` and ``reservations`` key of a restore point (its VM part keyed if sealed)."""
        return self.names.vm_key(vm) + b"\0" + rp_id.encode()

    def put_rp(
        self, txn: lmdb.Transaction, vm: str, rp_id: str, seq: int, doc: dict[str, Any]
    ) -> None:
        key = self.rp_key(vm, rp_id)
        self.put_rp_doc(txn, key, doc)
        self._put_seq(txn, seq, seq_target_rp(vm, rp_id))
        txn.delete(key, db=self.dbs["reservations"])

    def put_rp_doc(self, txn: lmdb.Transaction, key: bytes, doc: dict[str, Any]) -> None:
        """Store a restore point's index copy under its ``rps`` key (from :meth:`rp_items`)."""
        value = encode_rp(doc)
        txn.put(key, self.names.seal_value("rps", key, value), db=self.dbs["rps"])

    def rp_items(self, txn: lmdb.Transaction) -> Iterator[tuple[bytes, dict[str, Any]]]:
        """Every restore point's ``rps`` key and index copy."""
        for key, value in self.items(txn, "rps"):
            yield key, decode_rp(self.names.open_value("rps", key, value))

    def delete_rp(self, txn: lmdb.Transaction, vm: str, rp_id: str, seq: int) -> None:
        txn.delete(self.rp_key(vm, rp_id), db=self.dbs["rps"])
        txn.delete(seq_key(seq), db=self.dbs["seqs"])

    def get_rp(self, txn: lmdb.Transaction, vm: str, rp_id: str) -> dict[str, Any] | None:
        key = self.rp_key(vm, rp_id)
        raw = txn.get(key, db=self.dbs["rps"])
        return decode_rp(self.names.open_value("rps", key, raw)) if raw is not None else None

    def rp_docs(self, txn: lmdb.Transaction, vm: str | None = None) -> Iterator[dict[str, Any]]:
        prefix = self.names.vm_key(vm) + b"\0" if vm is not None else b""
        for key, value in self.items(txn, "rps", prefix):
            yield decode_rp(self.names.open_value("rps", key, value))

    def vm_names(self, txn: lmdb.Transaction) -> list[str]:
        """VMs that have at least one restore point, sorted."""
        names = []
        with txn.cursor(db=self.dbs["rps"]) as cur:
            ok = cur.first()
            while ok:
                key = cur.key()
                vm = self.names.vm_part(key)
                if self.names.encrypted:  # the name is only in the sealed value
                    doc = decode_rp(self.names.open_value("rps", key, cur.value()))
                    names.append(doc["vm"])
                else:
                    names.append(vm.decode())
                ok = cur.set_range(vm + b"\x01")
        return sorted(names)

    def rp_ids(self, txn: lmdb.Transaction, vm: str) -> list[str]:
        prefix = self.names.vm_key(vm) + b"\0"
        out = []
        with txn.cursor(db=self.dbs["rps"]) as cur:
            if cur.set_range(prefix):
                for key in cur.iternext(keys=True, values=False):
                    if not key.startswith(prefix):
                        break
                    out.append(key[len(prefix) :].decode())
        return out

    def latest_rp_id(self, txn: lmdb.Transaction, vm: str, db: str = "rps") -> str | None:
        """The VM's newest id in ``db`` (``rps``, or ``reservations`` of running ingests)."""
        vm_part = self.names.vm_key(vm)
        prefix = vm_part + b"\0"
        with txn.cursor(db=self.dbs[db]) as cur:
            found = cur.prev() if cur.set_range(vm_part + b"\x01") else cur.last()
            if found and cur.key().startswith(prefix):
                return cur.key()[len(prefix) :].decode()
        return None


def _address_space_share(map_size: int) -> int:
    """The map size, cut to a quarter of the address space where ``ulimit -v`` limits it.

    The 64 GiB default is address space only, but a process limited to less
    (some backup servers set ``ulimit -v``) could not map it at all.  The
    map still grows on demand; LMDB keeps a map at least as large as the
    file.
    """
    soft, _hard = resource.getrlimit(resource.RLIMIT_AS)
    if soft == resource.RLIM_INFINITY:
        return map_size
    return max(1 << 20, min(map_size, soft // 4))


def _check_room(path: str, create: bool) -> None:
    """Refuse to let LMDB create its files on a (nearly) full disk.

    LMDB sizes ``lock.mdb`` (and a new ``data.mdb``) sparsely and then
    writes through a memory map: with no block left that is SIGBUS, the
    process dies without a word.  A little less short, it fails with EIO,
    which would read as damage.
    """
    if not create and os.path.exists(os.path.join(path, "lock.mdb")):
        return
    free = free_bytes(path, as_this_user=True)
    if free is not None and free < CREATE_ROOM_BYTES:
        raise os_error(OSError(errno.ENOSPC, "No space"), path)


def _check_openable(path: str) -> None:
    """Refuse an index LMDB would open wrongly, or fail on with a misleading message.

    LMDB takes an empty ``data.mdb`` (truncated, or zeroed by a crash of the
    file system) for a new environment and initialises it: every command
    would then see an empty repository, and gc would delete every pack as
    unindexed.  And on a read-only file system it fails as if the index were
    damaged, which would send the administrator to rebuild-index for nothing.
    """
    data = os.path.join(path, "data.mdb")
    try:
        st = os.stat(data)
    except OSError as exc:
        if isinstance(exc, FileNotFoundError):
            raise RepositoryError(
                f"{path}: the index is missing; run 'repofs rebuild-index' to rebuild it "
                "from the packs"
            ) from None
        raise IndexAccessError(f"{data}: cannot open the index: {exc.strerror}") from None
    if st.st_size == 0:
        raise RepositoryError(f"{data}: the index is empty (truncated); run 'repofs rebuild-index'")
    # The meta page first, the size after: a writer extends the file before it writes the
    # meta page that names the new pages, so a commit in between cannot look like damage.
    needed = _lmdb_file_size(data)
    size = os.stat(data).st_size if needed is not None else 0
    if needed is not None and size < needed:
        # LMDB maps the file and would touch pages past its end: SIGBUS, no message at all.
        raise RepositoryError(
            f"{data}: the index is truncated ({size} of {needed} bytes); run 'repofs rebuild-index'"
        )
    with contextlib.suppress(OSError):
        if os.statvfs(path).f_flag & os.ST_RDONLY:
            raise IndexAccessError(
                f"{path}: is on a read-only file system; repofs needs to write its index "
                "and lock files (copy the repository to writable storage)"
            )


_LMDB_MAGIC = 0xBEEFC0DE
#: In each of the two meta pages (pages 0 and 1): magic, the page size (kept in the
#: free-list database's md_pad), then the last page used and the transaction id.
_META_MAGIC = struct.Struct("<I")
_META_PAGE_SIZE = struct.Struct("<I")  # at 16 + 24
_META_LAST = struct.Struct("<QQ")  # at 136: mm_last_pg, mm_txnid


def _lmdb_file_size(data: str) -> int | None:
    """The size the newest of LMDB's two meta pages says the file has at least; None if unknown."""
    try:
        with open(data, "rb") as f:
            head = f.read(4096)
            if len(head) < 160 or _META_MAGIC.unpack_from(head, 16)[0] != _LMDB_MAGIC:
                return None
            psize = _META_PAGE_SIZE.unpack_from(head, 40)[0]
            if not 512 <= psize <= 65536:
                return None
            f.seek(psize)
            second = f.read(160)
    except OSError:
        return None
    metas = [_META_LAST.unpack_from(head, 136)]
    if len(second) == 160 and _META_MAGIC.unpack_from(second, 16)[0] == _LMDB_MAGIC:
        metas.append(_META_LAST.unpack_from(second, 136))
    last_page, _txnid = max(metas, key=lambda m: m[1])
    return (last_page + 1) * psize


def _open_error(path: str, exc: lmdb.Error) -> RepositoryError:
    """Tell damage (rebuild-index helps) from the system refusing the open (it does not)."""
    text = str(exc)
    for cause in ("Permission denied", "Operation not permitted", "Read-only file system"):
        if cause in text:
            return IndexAccessError(f"{path}: cannot open the index: {cause}")
    if "Cannot allocate memory" in text:
        return IndexAccessError(
            f"{path}: cannot map the index: not enough memory or address space ({exc})"
        )
    return RepositoryError(f"{path}: the index is damaged ({exc}); run 'repofs rebuild-index'")


class _ResizeGate:
    """Transactions hold it shared, a map resize holds it exclusive.

    ``mdb_env_set_mapsize`` remaps the file; a transaction still open in
    another thread of the same process would then read through a stale
    mapping.  A waiting resize blocks new transactions so it cannot starve;
    a thread that already holds the gate may nest transactions freely.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._holders = 0
        self._resizing = False
        self._local = threading.local()

    @contextlib.contextmanager
    def shared(self) -> Iterator[None]:
        depth = getattr(self._local, "depth", 0)
        if depth == 0:
            with self._cond:
                while self._resizing:
                    self._cond.wait()
                self._holders += 1
        self._local.depth = depth + 1
        try:
            yield
        finally:
            self._local.depth = depth
            if depth == 0:
                with self._cond:
                    self._holders -= 1
                    self._cond.notify_all()

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        if getattr(self._local, "depth", 0):
            raise RuntimeError("cannot resize the LMDB map inside a transaction")
        with self._cond:
            while self._resizing:
                self._cond.wait()
            self._resizing = True
            while self._holders:
                self._cond.wait()
        try:
            yield
        finally:
            with self._cond:
                self._resizing = False
                self._cond.notify_all()
