"""A repository on disk: config, LMDB index and packs, and the commit protocol."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from repofs.errors import IntegrityError, RepofsError, RepositoryError, UsageError
from repofs.store import crypto
from repofs.store.config import (
    CONFIG_FILE,
    FORMAT_VERSION,
    PACK_TARGET,
    RepoConfig,
    upgrade_in_place,
)
from repofs.store.durable import make_dirs, os_error, write_file_atomic
from repofs.store.index import Index
from repofs.store.lock import repository_lock
from repofs.store.maps import MapReader, PageCache
from repofs.store.names import rp_id_for, rp_id_seconds
from repofs.store.packstore import LocalPackStore, PackStore
from repofs.store.recordcache import RecordCache
from repofs.store.records import RECORD_HEADER_SIZE, RecordType, decode_header, decode_payload
from repofs.store.reserve import retry_with_reserve, set_aside
from repofs.store.restorepoint import DiskInfo, RestorePoint
from repofs.store.rprecords import Tombstone
from repofs.store.schema import (
    Location,
    decode_location,
    decode_pack_info,
    encode_writer,
    key_type,
    whole_key,
)
from repofs.store.writer import ObjectWriter
from repofs.util import stopping

INDEX_DIR = "index"
NEW_INDEX_DIR = "index.new"  # where rebuild-index builds the next index
PACKS_DIR = "packs"


@dataclass(frozen=True)
class Reservation:
    """An id and sequence number taken for an ingest that has not committed yet."""

    vm: str
    rp_id: str
    seq: int
    vm_seq: int
    created: float
    gen: int = 0  #: the gc generation it started in: its commit looks for what gc condemned since


class Repository:
    """Opened repository.  Safe to share between threads for reading."""

    def __init__(
        self,
        path: str,
        config: RepoConfig,
        index: Index,
        packs: PackStore,
        keys: crypto.Keys | None = None,
    ) -> None:
        self.path = path
        self.config = config
        #: Names and seals objects; unlocked from a key source for an encrypted repository.
        self.keys = keys if keys is not None else open_keys(path, config)
        self.index = index
        index.names = self.keys
        self.packs = packs
        self.page_cache = PageCache(lambda d: self.read_object(RecordType.PAGE, d))
        #: Records kept on this host's disk (a bucket's mount); None: read the packs only.
        self.records: RecordCache | None = None

    # -- life cycle ---------------------------------------------------------------

    @classmethod
    def init(
        cls,
        path: str,
        chunk_size: int,
        compression: str,
        encryption: str = crypto.DEFAULT_CIPHER,
        *,
        create_bucket: bool = False,
        pack_size: int = PACK_TARGET,
    ) -> Repository:
        """Create a repository; ``encryption`` is ``none`` or an AEAD of :data:`crypto.CIPHERS`.

        An encrypted one takes its key from a key file (``--key-file``, which
        must not exist yet and is created) or a passphrase source, asked
        for before anything is written: no source and no terminal is a
        one-line error, never a silent unencrypted repository.
        """
        if not path:  # else makedirs fails with ": No such file or directory"
            raise UsageError("the repository path is empty")
        if create_bucket:
            raise UsageError("--create-bucket is for s3://BUCKET/PREFIX repositories only")
        chosen = crypto.new_key(encryption, lambda f: _inside(f, path))
        enc, key_file = chosen.enc, chosen.key_file
        config = RepoConfig.new(chunk_size, compression, enc, pack_size)
        key_blob = chosen.wrapped(config.repository_id)
        if os.path.lexists(path):
            if not os.path.isdir(path):
                raise UsageError(f"{path}: exists and is not a directory")
            if os.path.exists(os.path.join(path, CONFIG_FILE)):
                raise UsageError(f"{path}: a repository already exists here")
            if os.listdir(path):
                if not _interrupted_init(path):
                    raise UsageError(f"{path}: directory is not empty")
                import shutil  # only here: it imports bz2 and lzma, 5 ms of every start

                try:
                    shutil.rmtree(path)  # what an init killed before config.json left
                except OSError as exc:
                    raise os_error(exc, path) from None
        parent = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(parent):
            raise UsageError(f"{parent}: parent directory does not exist")
        # Inside another repository, rebuild-index or gc of that one would delete it.
        ancestor = os.path.realpath(parent)
        while True:
            if os.path.isfile(os.path.join(ancestor, CONFIG_FILE)) and os.path.isdir(
                os.path.join(ancestor, PACKS_DIR)
            ):
                raise UsageError(f"{path}: is inside the repository {ancestor}")
            up = os.path.dirname(ancestor)
            if up == ancestor:
                break
            ancestor = up
        # Every directory durable in its parent (the repository's own entry too: a power loss
        # must not take the repository away after its first ingest), config.json last.
        try:
            make_dirs(path)
            os.chmod(path, 0o700)
            for sub in (PACKS_DIR, os.path.join(PACKS_DIR, "tmp"), INDEX_DIR):
                make_dirs(os.path.join(path, sub))
        except OSError as exc:
            raise os_error(exc, path) from None
        Index(os.path.join(path, INDEX_DIR), create=True).close()
        set_aside(path)
        if enc is not None:
            if key_file is not None:
                crypto.write_new_file(
                    key_file, crypto.key_file_doc(chosen.master, enc, config.repository_id)
                )
            else:
                assert key_blob is not None
                write_file_atomic(os.path.join(path, crypto.KEY_FILE), key_blob)
        write_file_atomic(os.path.join(path, CONFIG_FILE), config.to_json())  # last: marks it done
        return cls.open(path, chosen.keys())

    @classmethod
    def open(cls, path: str, keys: crypto.Keys | None = None) -> Repository:
        """The repository in directory ``path`` (:func:`repofs.store.opening` takes URLs too)."""
        config = RepoConfig.load(path)
        if keys is None:
            keys = open_keys(path, config)  # before the index: a wrong key touches nothing
        index = Index(os.path.join(path, INDEX_DIR))
        packs = LocalPackStore(os.path.join(path, PACKS_DIR))
        try:
            # An index that knows no pack beside packs that exist was lost or replaced
            # (LMDB re-initialises an emptied file): trusting it would show no restore
            # points, and gc would delete every pack as unindexed.
            if index.is_empty() and next(iter(packs.list()), None) is not None:
                raise RepositoryError(
                    f"{os.path.join(path, INDEX_DIR)}: the index lists no packs but "
                    f"{PACKS_DIR}/ holds some: it was lost or replaced; run 'repofs rebuild-index'"
                )
        except BaseException:
            index.close()
            packs.close()
            raise
        return cls(path, config, index, packs, keys)

    @property
    def name(self) -> str:
        """How messages name the repository: its path (or its bucket URL)."""
        return self.path

    def sync(self) -> int:
        """Catch up with other hosts' changes: nothing to do for a local directory."""
        return 0

    def flag_seqs(self, n: int) -> list[int]:
        """``n`` new protection sequence numbers, higher than every earlier one."""
        return self.index.write(lambda txn: [self.index.next_seq(txn) for _ in range(n)])

    def close(self) -> None:
        self.index.close()
        self.packs.close()

    def __enter__(self) -> Repository:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- reading objects ----------------------------------------------------------

    def use_record_cache(self) -> None:
        """Keep records read from the packs on this host's disk too (see :attr:`records`).

        Only readers call it (the mount): what checks the packs themselves
        (verify, gc) must never be answered from a copy.  Nothing to do for
        a local directory, whose packs are already on disk.
        """
        return None

    def read_at(self, rtype: RecordType, digest: bytes, loc: Location) -> bytes:
        """Read one record at a known location and check it is the object asked for.

        A record from the on-disk cache gets the same check; one that fails
        it is dropped there and read from its pack instead.
        """
        size = RECORD_HEADER_SIZE + loc.stored_len
        cache = self.records
        if cache is not None:
            cached = cache.get(loc.pack_id, loc.offset, size)
            if cached is not None:
                try:
                    return self.decode_at(rtype, digest, loc, cached)
                except IntegrityError:
                    cache.drop(loc.pack_id, loc.offset)
        data = self.packs.read(loc.pack_id, loc.offset, size)
        out = self.decode_at(rtype, digest, loc, data)
        if cache is not None:
            cache.put(loc.pack_id, loc.offset, data)
        return out

    def decode_at(self, rtype: RecordType, digest: bytes, loc: Location, data: bytes) -> bytes:
        """Check and decode the record ``data`` read from ``loc`` (header and payload)."""
        where = f"pack {loc.pack_id.hex()} offset {loc.offset}"
        hdr = decode_header(data, where)
        if hdr.type != rtype or hdr.digest != digest:
            raise IntegrityError(f"{where}: holds another object than the index says")
        return decode_payload(hdr, data[RECORD_HEADER_SIZE:], where, self.keys)

    def read_object(self, rtype: RecordType, digest: bytes) -> bytes:
        """The verified content of an object: the stored bytes, or :class:`IntegrityError`.

        If the pack named by the index vanished (gc moved the object), the
        index is asked once more: the new location is committed before the
        old pack is deleted.
        """
        loc = self.index.locate(rtype, digest)
        if loc is None:
            # Condemned by a gc while an ingest (a CBT parent's pages) or a reader still uses
            # it: the pack stays until every writer that could have seen the object has ended.
            loc = self.index.locate_condemned(rtype, digest)
        if loc is None:
            raise IntegrityError(f"{rtype.name.lower()} {digest.hex()} is not in the index")
        try:
            return self.read_at(rtype, digest, loc)
        except IntegrityError:
            again = self.index.locate(rtype, digest)
            if again is None or again == loc:
                raise
            self.packs.forget(loc.pack_id)
            return self.read_at(rtype, digest, again)

    def map_reader(self, disk: DiskInfo) -> MapReader:
        """A reader of ``disk``'s map; :class:`IntegrityError` if its record disagrees with it.

        Every reader of a disk (the mount, an incremental's parent) comes
        through here, so a record whose capacity says more than its map
        covers is an I/O error, never a short read or zeros.
        """
        problem = disk.inconsistency(self.config.chunk_size, self.config.page_refs)
        if problem is not None:
            raise IntegrityError(f"inconsistent restore point record: {problem}")
        return MapReader(disk.map, self.config.page_refs, self.page_cache)

    # -- restore points -----------------------------------------------------------

    def vm_names(self) -> list[str]:
        return self.index.read(self.index.vm_names)

    def restore_points(self, vm: str | None = None) -> list[RestorePoint]:
        return self.index.read(
            lambda t: [RestorePoint.from_doc(d) for d in self.index.rp_docs(t, vm)]
        )

    def get_rp(self, vm: str, rp_id: str) -> RestorePoint | None:
        doc = self.index.read(lambda t: self.index.get_rp(t, vm, rp_id))
        return RestorePoint.from_doc(doc) if doc is not None else None

    def latest(self, vm: str) -> RestorePoint | None:
        rp_id = self.index.read(lambda t: self.index.latest_rp_id(t, vm))
        return self.get_rp(vm, rp_id) if rp_id else None

    def resolve(self, vm: str, spec: str) -> RestorePoint:
        """A restore point by id or ``latest``; a one-line error if there is none."""
        rp = self.latest(vm) if spec == "latest" else self.get_rp(vm, spec)
        if rp is None:
            if not self.restore_points(vm):
                raise UsageError(f"unknown VM {vm!r}: it has no restore points")
            raise UsageError(f"VM {vm!r} has no restore point {spec!r}")
        return rp

    # -- writing ------------------------------------------------------------------

    def upgrade(self) -> bool:
        """Upgrade a version-1 repository in place to this format; True if it was older.

        Called before the first pack is written (see :meth:`writer`): version 2
        only adds record fields and a record type, so the config's version
        is all that changes, atomically.  Reading never upgrades, so a
        repository that is only listed, mounted or verified stays readable
        by an older repofs.
        """
        if self.config.version >= FORMAT_VERSION:
            return False
        upgraded = upgrade_in_place(self.path)
        self.config = dataclasses.replace(self.config, version=FORMAT_VERSION)
        if upgraded:
            # A mount an older repofs started before this keeps its open index and
            # fails every VM directory holding a format-2 record with EIO: say so once.
            print(
                f"repofs: warning: {self.path}: upgraded to format version {FORMAT_VERSION}; "
                "an older repofs cannot open it now, and a mount an older repofs started "
                "must be remounted",
                file=sys.stderr,
                flush=True,
            )
        return upgraded

    def writer(self) -> ObjectWriter:
        self.upgrade()
        cfg = self.config
        return ObjectWriter(
            self.index,
            self.packs,
            cfg.repository_id,
            cfg.pack_target_size,
            (cfg.codec, cfg.level),
            self.keys,
        )

    @contextlib.contextmanager
    def lock(self, *, exclusive: bool = False) -> Iterator[None]:
        """Hold the repository lock, then follow a replaced index.

        The repository was opened (and perhaps read) before the lock was
        taken; rebuild-index may have swapped in a new index while this
        command waited.  Acting on the old one would make decisions (what
        is dead, what is the latest restore point) from a file that no
        longer counts.  Under the shared lock no rebuild can start.
        """
        with repository_lock(self.path, exclusive=exclusive):
            self.index.follow_replacement()
            yield

    @contextlib.contextmanager
    def lease(self, what: str, *, required: bool = True) -> Iterator[None]:
        """Register a writer other than an ingest, or a reader that trusts what it listed.

        gc deletes a condemned object's pack, or an unindexed pack, only
        once no holder that was running when gc condemned or found it is
        left.  An ingest's reservation says that for an ingest; a lease
        does for prune's tombstones (a pack published before it is
        indexed) and for verify (objects it listed before gc condemned
        them).  A killed holder's lease is dropped by gc.  Not ``required``:
        an index that cannot be written (damaged) goes without.
        """
        key = os.urandom(8)

        def take(txn: Any) -> None:
            doc = {
                "pid": os.getpid(),
                "started": time.time(),
                "gen": self.index.gc_generation(txn),
                "what": what,
            }
            self.index.put(txn, "leases", key, encode_writer(doc))

        try:
            self.index.write(take)
        except RepofsError:
            if required:
                raise
        try:
            yield
        finally:
            with contextlib.suppress(RepofsError):  # gc drops it once we are gone
                self.index.write(lambda txn: self.index.delete(txn, "leases", key))

    def reserve(self, vm: str, now: float | None = None, parent: str | None = None) -> Reservation:
        """Take the restore point id (its UTC start time, to the second) and a sequence number.

        Ids are unique within a VM and always sort in creation order: when the
        second is taken, or lies before the VM's newest id (the clock was set
        back), the next free second after the newest is used.  Otherwise
        ``latest``, and with it the parent of the next changed-block ingest,
        would be an older backup than the last one taken, and that ingest
        would store the wrong bytes.  The creation time (every file's mtime
        and ctime) stays the real one: a time in the future would make
        incremental tape sweeps pick the files up twice.

        The reservation carries the gc generation, and ``parent`` must still
        be committed in the same transaction: from here on, whatever a gc
        condemns that this ingest may use (its parent's pages, chunks it
        deduplicates against) has a newer generation, which its commit sees.
        """
        created = time.time() if now is None else now

        def txn_fn(txn: Any) -> Reservation:
            parent_key = self.index.rp_key(vm, parent) if parent is not None else b""
            if parent is not None and self.index.get(txn, "rps", parent_key) is None:
                # Pruned (and perhaps collected) before we reserved: its pages may be gone.
                raise UsageError(
                    f"parent restore point {vm}/{parent} was pruned while "
                    "this ingest started; run the ingest again"
                )
            gen = self.index.gc_generation(txn)
            vm_seq = self.index.vm_seq(txn, vm, allocate=True)
            assert vm_seq is not None
            second = int(created)
            newest = self.index.latest_rp_id(txn, vm, db="reservations")
            for rp_id in (self.index.latest_rp_id(txn, vm), newest):
                if rp_id is not None:
                    second = max(second, rp_id_seconds(rp_id) + 1)
            while True:
                rp_id = rp_id_for(second)
                key = self.index.rp_key(vm, rp_id)
                if (
                    self.index.get(txn, "rps", key) is None
                    and self.index.get(txn, "reservations", key) is None
                ):
                    break
                second += 1
            seq = self.index.next_seq(txn)
            doc = {"seq": seq, "pid": os.getpid(), "started": created, "gen": gen}
            self.index.put(txn, "reservations", key, encode_writer(doc))
            return Reservation(vm, rp_id, seq, vm_seq, created, gen)

        return self.index.write(txn_fn)

    def release(self, res: Reservation) -> None:
        """Give back a reservation of an ingest that failed."""
        self.index.write(
            lambda txn: self.index.delete(txn, "reservations", self.index.rp_key(res.vm, res.rp_id))
        )

    def commit(self, writer: ObjectWriter, rp: RestorePoint, since_gen: int | None = None) -> None:
        """Make ``rp`` visible, in the one durability order that keeps invariant 2.

        1. every chunk, page and blob the restore point references is in a
           published (fsynced, renamed, directory-fsynced) pack, and indexed;
        2. its own record, so that ``rebuild-index`` can find it without the
           index, lies after all of them: in the ingest's last pack (or a
           pack of its own when that one is full).  The writer publishes its
           packs one after the other, so the pack with the record becomes
           durable only once every earlier one is;
        3. one LMDB transaction adds it to ``rps`` and drops its reservation.
           Before that commit nothing shows it; after it, all of it is durable.

        Steps 1 and 2 are one ``flush``: a record of its own pack cost every
        ingest one more pack file, ``fsync`` and index transaction.

        gc runs beside ingests and may have condemned, since the ingest's
        reservation (gc generation ``since_gen``; None: unknown), objects
        the restore point references: chunks it deduplicated against, its
        parent's pages, its own new packs.  Their files still exist (gc
        deletes nothing a running writer may use), so the commit
        transaction brings them back (:func:`repofs.store.revive.revive`) before
        it makes the restore point visible.
        """
        body = json.dumps(rp.to_doc(), sort_keys=True).encode()
        _digest, loc = writer.put_new(RecordType.RESTORE_POINT, body)
        try:
            writer.flush()
            rp.record = [loc.pack_id.hex(), loc.offset]
            doc = rp.to_doc()
            _pause_for_fault_tests()
        except KeyboardInterrupt:
            self._bury_uncommitted(rp)
            raise

        def txn_fn(txn: Any) -> None:
            if since_gen is None or self.index.gc_generation(txn) != since_gen:
                from repofs.store.revive import revive

                revive(self, txn, rp)
            self.index.set_vm_seq(txn, rp.vm, rp.vm_seq)
            self.index.put_rp(txn, rp.vm, rp.id, rp.seq, doc)
            self.index.put(txn, "meta", whole_key(rp.seq), b"")

        stopping.ignore_from_now_on()
        try:
            self.index.write(txn_fn)
        except RepofsError:
            if not self._committed(rp):
                self._bury_uncommitted(rp, use_reserve=True)
            else:  # the failure came after LMDB's commit (its padding): it is there
                return
            raise

    def known_whole(self, rp: RestorePoint) -> bool:
        """Whether this index has held every object ``rp`` references since its commit.

        Every ingest references only objects it found in the index or wrote
        (a changed-block incremental checks what it inherits), and commit
        marks it so in the index itself, not in its record: an index that
        ``rebuild-index`` builds anew, perhaps without a damaged record, has
        no such marks, so the next incremental checks its parent once.  gc
        removes only objects no restore point references; whatever else
        removes referenced objects from an index must drop these marks.
        """
        key = whole_key(rp.seq)
        return self.index.read(lambda txn: self.index.get(txn, "meta", key)) is not None

    def _committed(self, rp: RestorePoint) -> bool:
        """Whether the index shows ``rp`` after all (a failure after LMDB's own commit)."""
        try:
            doc = self.index.read(lambda t: self.index.get_rp(t, rp.vm, rp.id))
        except Exception:  # an index that cannot be read shows nothing
            return False
        return doc is not None and doc.get("seq") == rp.seq

    def _bury_uncommitted(self, rp: RestorePoint, *, use_reserve: bool = False) -> None:
        """Tombstone the record of an ingest stopped before its commit, or whose commit failed.

        The record may already be in a published pack.  gc tombstones such
        records too, but a rebuild-index before the next gc brought the
        restore point back, complete, although its ingest had reported
        "terminated" (or failed): a job run again for it then made a
        duplicate.  A final index write that failed (a full disk, an fsync
        error) gives up the repository's reserve for the tombstone if the
        disk is full (``use_reserve``): it is what failed the commit.  Only
        a kill -9, or no room even then, leaves it to gc.
        """
        with contextlib.suppress(RepofsError, OSError):
            if use_reserve:
                retry_with_reserve(self.path, lambda: self.write_tombstones([rp]))
            else:
                self.write_tombstones([rp])

    def write_tombstones(self, rps: list[RestorePoint]) -> None:
        """Tombstone records for ``rps``, durable and indexed when this returns, or none."""
        bodies = [Tombstone(rp.vm, rp.id, rp.seq, rp.vm_seq).body() for rp in rps]
        self.publish_records("tombstones", RecordType.TOMBSTONE, bodies)

    def publish_records(self, what: str, rtype: RecordType, bodies: list[bytes]) -> None:
        """Records that rebuild-index obeys, durable and indexed when this returns, or none.

        Under a lease named ``what``: their pack is published before it is
        indexed, and gc must not take it for a leftover meanwhile.
        """
        with self.lease(what):
            writer = self.writer()
            try:
                for body in bodies:
                    writer.put_new(rtype, body)
                writer.flush()
            except BaseException:
                writer.abort()
                raise

    # -- statistics ---------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        def txn_fn(txn: Any) -> dict[str, Any]:
            counts = {t: 0 for t in RecordType}
            raw_bytes = {t: 0 for t in RecordType}
            stored_bytes = {t: 0 for t in RecordType}
            for key, value in self.index.items(txn, "objects"):
                rtype = RecordType(key_type(key))
                loc = decode_location(value)
                counts[rtype] += 1
                raw_bytes[rtype] += loc.raw_len
                stored_bytes[rtype] += loc.stored_len
            pack_bytes = 0
            pack_count = 0
            for _key, value in self.index.items(txn, "packs"):
                pack_bytes += decode_pack_info(value)[0]
                pack_count += 1
            logical = 0
            allocated = 0
            rps = 0
            for doc in self.index.rp_docs(txn):
                rps += 1
                for d in doc["disks"]:
                    logical += d["capacity"]
                    allocated += d["allocated_bytes"]
            vms = len(self.index.vm_names(txn))
            return {
                "vms": vms,
                "restore_points": rps,
                "logical_bytes": logical,
                "allocated_bytes": allocated,
                "unique_bytes": raw_bytes[RecordType.CHUNK],
                "stored_chunk_bytes": stored_bytes[RecordType.CHUNK],
                "metadata_bytes": stored_bytes[RecordType.PAGE]
                + stored_bytes[RecordType.BLOB]
                + stored_bytes[RecordType.RESTORE_POINT],
                "chunk_count": counts[RecordType.CHUNK],
                "page_count": counts[RecordType.PAGE],
                "pack_count": pack_count,
                "pack_bytes": pack_bytes,
                "dedup_ratio": (allocated / raw_bytes[RecordType.CHUNK])
                if raw_bytes[RecordType.CHUNK]
                else 0.0,
                "compression_ratio": (raw_bytes[RecordType.CHUNK] / stored_bytes[RecordType.CHUNK])
                if stored_bytes[RecordType.CHUNK]
                else 0.0,
                "chunk_size": self.config.chunk_size,
            }

        return self.index.read(txn_fn)


PAUSE_BEFORE_COMMIT_ENV = "REPOFS_TEST_PAUSE_BEFORE_COMMIT"


def _pause_for_fault_tests() -> None:
    """Fault-injection hook, unset in production: sleep between steps 2 and 3 of a commit.

    ``REPOFS_TEST_PAUSE_BEFORE_COMMIT=SECONDS`` lets tests kill an ingest,
    or run gc beside it, at the one moment where everything is durable but
    nothing is visible yet.  The line on stderr tells them the moment came.
    """
    pause = os.environ.get(PAUSE_BEFORE_COMMIT_ENV)
    if pause:
        print("repofs: test hook: pausing before commit", file=sys.stderr, flush=True)
        time.sleep(float(pause))


def _interrupted_init(path: str) -> bool:
    """Whether ``path`` holds only what an ``init`` killed before writing config.json leaves.

    config.json is written last, so such a directory never held a backup:
    init may start over there instead of asking for an ``rm -rf``.
    """
    skeleton = {PACKS_DIR, INDEX_DIR, "reserve", "lock.gate", "lock.main", "lock.gc", "key"}
    for name in os.listdir(path):
        if name not in skeleton and not name.startswith(
            ("reserve.tmp.", f"{CONFIG_FILE}.tmp.", f"{crypto.KEY_FILE}.tmp.")
        ):
            return False
    packs = os.path.join(path, PACKS_DIR)
    for dirpath, _dirs, files in os.walk(packs):
        if dirpath != os.path.join(packs, "tmp") and files:
            return False
    index = os.path.join(path, INDEX_DIR)
    return not os.path.isdir(index) or set(os.listdir(index)) <= {"data.mdb", "lock.mdb"}


def open_keys(path: str, config: RepoConfig) -> crypto.Keys:
    """The repository's keys: plain, or unlocked from its key source (one line if wrong)."""
    return crypto.keys_for(path, config.encryption, config.repository_id)


def _inside(file: str, repo: str) -> bool:
    """Whether ``file`` would lie inside the repository directory ``repo``."""
    f = os.path.realpath(os.path.abspath(file))
    r = os.path.realpath(os.path.abspath(repo))
    return f == r or f.startswith(r.rstrip(os.sep) + os.sep)
