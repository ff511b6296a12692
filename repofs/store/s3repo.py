"""A repository in an S3-compatible bucket, with this host's cache of its index.

Everything above :class:`~repofs.store.repository.Repository` works on the
same tables as with a local directory: this class keeps them in a per-host
cache (``--cache-dir``, default ``$XDG_CACHE_HOME/repofs/<repository id>``)
filled from the bucket's log (:mod:`repofs.store.bucketlog`), stores packs
as objects (:mod:`repofs.store.s3packs`), and replaces the three steps that
a local repository does with LMDB transactions:

* reserve: a lease in the bucket first, then a sync, then an id;
* commit: every pack acknowledged, then one conditional PUT of the commit
  object, the one write that makes the restore point visible to all hosts;
* tombstones and protection: facts in the log.

Deleting the cache loses nothing: the next command builds it again from
the newest checkpoint and the log.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import threading
import time
from collections.abc import Iterator
from typing import Any

from repofs.errors import IntegrityError, RepofsError, RepositoryError, UsageError
from repofs.store import crypto
from repofs.store.bucket import Bucket, ObjectStoreError
from repofs.store.bucketlog import BucketLog, nonce_of, rp_seq_of, vm_seq_of
from repofs.store.config import CONFIG_FILE, PACK_TARGET, RepoConfig
from repofs.store.durable import make_dirs, os_error, write_file_atomic
from repofs.store.index import Index
from repofs.store.leases import Lease
from repofs.store.location import S3Location, cache_dir_for, parse_s3, s3_settings
from repofs.store.names import rp_id_for, rp_id_seconds
from repofs.store.recordcache import CACHE_SUBDIR, RecordCache
from repofs.store.records import RecordType
from repofs.store.repository import INDEX_DIR, Repository, Reservation
from repofs.store.reserve import set_aside
from repofs.store.restorepoint import RestorePoint
from repofs.store.rprecords import parse_protection, parse_tombstone
from repofs.store.s3packs import S3PackStore
from repofs.store.schema import Location, encode_writer, whole_key
from repofs.store.segment import Entry, Segment
from repofs.store.writer import ObjectWriter
from repofs.util import stopping

CACHE_MARK = "cache.json"  #: names the bucket a cache directory belongs to
COMMIT_ATTEMPTS = 20  #: ids tried when other hosts keep committing the same second


class BucketWriter(ObjectWriter):
    """Packs for a bucket: uploaded in parallel, made known by facts in the log, not the cache.

    A pack this ingest uploaded must not enter the cache before a log
    object names it: another ingest on this host would deduplicate against
    it, and if this one died, nothing in the bucket would say the pack
    exists, so gc would delete it as a leftover.  Its objects stay in
    :attr:`pending` meanwhile.  Every :data:`ANNOUNCE_EVERY` packs, one
    facts object introduces them (and the cache learns them), so memory
    stays bounded however large the ingest; the rest go in the commit.

    Introducing packs before the commit is safe: until a restore point
    references them they are dead to gc like any pack, and gc deletes a
    condemned pack only once every lease older than the condemnation has
    ended and a fresh mark still finds it dead (``docs/object-storage.md``).
    """

    PUBLISHERS = 4
    MAX_PUBLISHING = 4
    ANNOUNCE_EVERY = 32  #: packs (1 GiB at 32 MiB each) per facts object before the commit

    def __init__(self, *args: Any, log: BucketLog, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._log = log
        #: packs not yet named by a log object: the commit's list
        self.introduced: list[tuple[bytes, int, list[Entry]]] = []
        self._announced: list[list[Entry]] = []  # for the main thread to drop from pending
        self._intro_lock = threading.Lock()

    def _index_pack(self, pack_id: bytes, size: int, entries: list[Entry]) -> None:
        with self._intro_lock:
            self.introduced.append((pack_id, size, entries))
            if len(self.introduced) < self.ANNOUNCE_EVERY:
                return
            batch, self.introduced = self.introduced, []
        try:
            self._log.publish(Segment("facts", packs=batch))
        except BaseException:
            with self._intro_lock:
                self.introduced[:0] = batch  # the commit names them after all
            raise
        with self._intro_lock:
            self._announced.extend(entries for _p, _s, entries in batch)

    def _published(self, entries: list[Entry]) -> None:
        """Forget from :attr:`pending` only what a log object has introduced."""
        with self._intro_lock:
            done, self._announced = self._announced, []
        for announced in done:
            super()._published(announced)


class S3Repository(Repository):
    """A repository in a bucket; :attr:`path` is this host's cache directory."""

    def __init__(
        self,
        location: S3Location,
        bucket: Bucket,
        cache: str,
        config: RepoConfig,
        index: Index,
        keys: crypto.Keys,
    ) -> None:
        self.location = location
        self.bucket = bucket
        super().__init__(cache, config, index, S3PackStore(bucket), keys)  # type: ignore[arg-type]
        self.log = BucketLog(bucket, keys, index)
        self.log.shape = (config.chunk_size, config.page_refs)
        self._lease: Lease | None = None
        self._sync_lock = threading.Lock()
        self._sync_started = 0.0  # monotonic time the last sync began

    @property
    def name(self) -> str:
        return self.location.url

    # -- life cycle ---------------------------------------------------------------

    @classmethod
    def init_bucket(
        cls,
        url: str,
        chunk_size: int,
        compression: str,
        encryption: str = crypto.DEFAULT_CIPHER,
        *,
        create_bucket: bool = False,
        pack_size: int = PACK_TARGET,
    ) -> S3Repository:
        location = parse_s3(url)
        bucket = Bucket(location)
        if not bucket.exists():
            if not create_bucket:
                bucket.check()  # the one-line "no such bucket" error
            bucket.create()
        if bucket.head(CONFIG_FILE) is not None:
            raise UsageError(f"{url}: a repository already exists here")
        _refuse_nested(location)
        held = [info.name for _, info in zip(range(2), bucket.list(""), strict=False)]
        if held == [crypto.KEY_FILE]:  # what an init killed before its config.json leaves
            raise UsageError(
                f"{url}: holds only the key object of an interrupted init; delete "
                f"{location.url}/{crypto.KEY_FILE} and run init again"
            )
        if held:
            raise UsageError(f"{url}: the prefix already holds objects (not a repository)")
        chosen = crypto.new_key(encryption)
        enc, key_file = chosen.enc, chosen.key_file
        config = RepoConfig.new(chunk_size, compression, enc, pack_size)
        key_blob = chosen.wrapped(config.repository_id)
        if enc is not None and key_file is not None:
            crypto.write_new_file(
                key_file, crypto.key_file_doc(chosen.master, enc, config.repository_id)
            )
        # Exclusive, as config.json: of two inits at once, the one that loses the key
        # must not overwrite the winner's (its config would then name a key the
        # bucket no longer holds, and the repository would never open).
        if key_blob is not None and not bucket.put(crypto.KEY_FILE, key_blob, exclusive=True):
            raise UsageError(f"{url}: another repofs init is creating a repository here")
        # Last, and only if no other init got there first: it marks the repository done.
        if not bucket.put(CONFIG_FILE, config.to_json(), exclusive=True):
            raise UsageError(f"{url}: another repofs init created a repository here meanwhile")
        return cls.open_bucket(url, chosen.keys())

    @classmethod
    def open_bucket(cls, url: str, keys: crypto.Keys | None = None) -> S3Repository:
        location = parse_s3(url)
        bucket = Bucket(location)
        try:
            raw = bucket.get(CONFIG_FILE)
        except IntegrityError:  # 404: the bucket is there, the repository is not
            bucket.check()
            raise RepositoryError(f"{url}: not a repofs repository (no {CONFIG_FILE})") from None
        config = RepoConfig.parse(raw, f"{url}/{CONFIG_FILE}")
        if keys is None:
            blob = None
            if config.encryption is not None and config.encryption.key == "passphrase":
                try:
                    blob = bucket.get(crypto.KEY_FILE)
                except IntegrityError:
                    blob = None
            keys = crypto.keys_from_key_object(url, blob, config.encryption, config.repository_id)
        cache = _open_cache(location, config)
        index = Index(os.path.join(cache, INDEX_DIR), create=not _has_index(cache))
        repo = cls(location, bucket, cache, config, index, keys)
        try:
            repo.sync()
        except BaseException:
            repo.close()
            raise
        return repo

    def close(self) -> None:
        if self._lease is not None:
            self._lease.end()
            self._lease = None
        super().close()

    # -- the cache ----------------------------------------------------------------

    def sync(self) -> int:
        """Bring this host's cache up to what the bucket holds; how many log objects it applied.

        One at a time in this process (the mount's periodic sync and a
        read's retry may meet); applying is idempotent anyway.
        """
        with self._sync_lock:
            self._sync_started = time.monotonic()
            return self.log.sync()

    def sync_since(self, moment: float) -> None:
        """A sync that began after ``moment`` (monotonic): the last one, or a new one."""
        with self._sync_lock:
            if self._sync_started > moment:
                return
            self._sync_started = time.monotonic()
            self.log.sync()

    def use_record_cache(self) -> None:
        """Keep the records this process reads in ``chunks/`` of the cache, bounded.

        The bound is the S3 settings' ``cache_size`` (``--cache-size``,
        ``--disk-cache-size`` on mount, ``REPOFS_CACHE_SIZE``).
        """
        if self.records is None:
            self.records = RecordCache(
                os.path.join(self.path, CACHE_SUBDIR), s3_settings().cache_size
            )

    def read_object(self, rtype: RecordType, digest: bytes) -> bytes:
        """As for a local repository, but a failed read syncs once and looks again.

        gc on another host may have moved the object and retired its pack:
        this host learns the new location only from the log.  A sync that
        began after the failure is enough (concurrent failing reads share
        one); a sync that fails leaves the original error.
        """
        try:
            return super().read_object(rtype, digest)
        except IntegrityError:
            failed_at = time.monotonic()
            before = self._locate_any(rtype, digest)
            with contextlib.suppress(RepofsError):
                self.sync_since(failed_at)
            after = self._locate_any(rtype, digest)
            if after is None or after == before:
                raise
        if before is not None:
            self.packs.forget(before.pack_id)
        return self.read_at(rtype, digest, after)

    def _locate_any(self, rtype: RecordType, digest: bytes) -> Location | None:
        loc = self.index.locate(rtype, digest)
        return loc if loc is not None else self.index.locate_condemned(rtype, digest)

    @contextlib.contextmanager
    def lock(self, *, exclusive: bool = False) -> Iterator[None]:
        """The cache's lock (other commands on this host), then a sync: act on fresh facts."""
        with super().lock(exclusive=exclusive):
            self.sync()
            yield

    @contextlib.contextmanager
    def lease(self, what: str, *, required: bool = True) -> Iterator[None]:
        """A lease in the bucket: gc on any host deletes nothing this command may still use."""
        lease = Lease(self.bucket, self.keys, what).start()
        try:
            self.sync()  # after the lease: what gc condemned before it, this command sees
            yield
        finally:
            lease.end()

    def upgrade(self) -> bool:
        return False  # a bucket is created at the current format

    # -- writing ------------------------------------------------------------------

    def writer(self) -> ObjectWriter:
        cfg = self.config
        return BucketWriter(
            self.index,
            self.packs,
            cfg.repository_id,
            cfg.pack_target_size,
            (cfg.codec, cfg.level),
            self.keys,
            log=self.log,
        )

    def reserve(self, vm: str, now: float | None = None, parent: str | None = None) -> Reservation:
        """A lease, a sync, then the id: newest + 1 second rule as locally, seqs from hashes."""
        if self._lease is not None:
            self._lease.end()
        self._lease = Lease(self.bucket, self.keys, "ingest").start()
        try:
            self.sync()
            return self._reserve_local(vm, now, parent)
        except BaseException:
            self._lease.end()
            self._lease = None
            raise

    def _reserve_local(
        self, vm: str, now: float | None, parent: str | None, after: str | None = None
    ) -> Reservation:
        created = time.time() if now is None else now

        def txn_fn(txn: Any) -> Reservation:
            idx = self.index
            if parent is not None and idx.get(txn, "rps", idx.rp_key(vm, parent)) is None:
                raise UsageError(
                    f"parent restore point {vm}/{parent} was pruned while "
                    "this ingest started; run the ingest again"
                )
            second = int(created)
            for rp_id in (
                idx.latest_rp_id(txn, vm),
                idx.latest_rp_id(txn, vm, db="reservations"),
                after,
            ):
                if rp_id is not None:
                    second = max(second, rp_id_seconds(rp_id) + 1)
            prefix = idx.rp_key(vm, "")
            buried = {k[len(prefix) : -16] for k, _ in idx.items(txn, "buried", prefix)}
            while True:
                rp_id = rp_id_for(second)
                key = idx.rp_key(vm, rp_id)
                if (
                    idx.get(txn, "rps", key) is None
                    and idx.get(txn, "reservations", key) is None
                    and rp_id.encode() not in buried
                ):
                    break
                second += 1
            vm_seq = idx.vm_seq(txn, vm) or vm_seq_of(idx, vm)
            seq = rp_seq_of(idx, vm, rp_id)
            doc = {"seq": seq, "pid": os.getpid(), "started": created, "gen": 0}
            idx.put(txn, "reservations", key, encode_writer(doc))
            return Reservation(vm, rp_id, seq, vm_seq, created, 0)

        return self.index.write(txn_fn)

    def release(self, res: Reservation) -> None:
        try:
            super().release(res)
        finally:
            if self._lease is not None:
                self._lease.end()
                self._lease = None

    def commit(self, writer: ObjectWriter, rp: RestorePoint, since_gen: int | None = None) -> None:
        """Every pack acknowledged, then the commit object with If-None-Match: the visible moment.

        Another host committing the same VM in the same second wins the
        name; this commit then takes the next free second (its record is
        written again with the new id) and tries once more.
        """
        assert isinstance(writer, BucketWriter)
        for _attempt in range(COMMIT_ATTEMPTS):
            body = json.dumps(rp.to_doc(), sort_keys=True).encode()
            _digest, loc = writer.put_new(RecordType.RESTORE_POINT, body)
            try:
                writer.flush()
            except KeyboardInterrupt:
                raise
            rp.record = [loc.pack_id.hex(), loc.offset]
            doc = rp.to_doc()
            seg = Segment("commit", packs=list(writer.introduced), rps=[doc])
            if self._lease is not None:
                self._lease.check()
            _pause_for_fault_tests()
            stopping.ignore_from_now_on()
            try:
                name = self.log.put_commit(seg, rp.vm, rp.id)
            except RepofsError:
                # Not there when looked for: a bury fact for exactly this commit (its
                # nonce) keeps it from ever showing should the lost PUT land later.
                with contextlib.suppress(RepofsError):
                    self.write_tombstones([rp])
                raise
            if name is not None:
                self.index.write(lambda txn, s=seg, n=name: self._applied_commit(txn, s, n, rp))
                if self._lease is not None:
                    self._lease.end()
                    self._lease = None
                self.log.maybe_checkpoint()
                return
            # Another host took this id: the next free one, and its own record.
            old = rp.id
            self.sync()
            res = self._reserve_local(rp.vm, rp.created, None, after=old)
            self.index.write(
                lambda txn, o=old: self.index.delete(
                    txn, "reservations", self.index.rp_key(rp.vm, o)
                )
            )
            rp.id, rp.seq, rp.vm_seq = res.rp_id, res.seq, res.vm_seq
        raise RepositoryError(
            f"{self.name}: could not find a free restore point id for {rp.vm} after "
            f"{COMMIT_ATTEMPTS} tries (other hosts commit the same VM at once)"
        )

    def _applied_commit(self, txn: Any, seg: Segment, name: str, rp: RestorePoint) -> None:
        self.log.apply(txn, seg, name)
        self.index.delete(txn, "reservations", self.index.rp_key(rp.vm, rp.id))
        doc = self.index.get_rp(txn, rp.vm, rp.id)
        if doc is not None and doc.get("record") == rp.record:
            rp.seq, rp.vm_seq = int(doc["seq"]), int(doc["vm_seq"])
            self.index.put(txn, "meta", whole_key(rp.seq), b"")

    def write_tombstones(self, rps: list[RestorePoint]) -> None:
        """A bury fact for each: on every host they disappear at its next sync."""
        bury = [
            {"vm": rp.vm, "id": rp.id, "nonce": nonce_of({"record": rp.record}).hex()} for rp in rps
        ]
        self.log.publish(Segment("facts", bury=bury))

    def publish_records(self, what: str, rtype: RecordType, bodies: list[bytes]) -> None:
        """Protection records (and tombstones) as facts in the log."""
        seg = Segment("facts")
        for body in bodies:
            if rtype == RecordType.PROTECTION:
                flag = parse_protection(body)
                if flag is None:
                    raise RepositoryError("internal: a malformed protection record")
                seg.protect.append(json.loads(body))
            elif rtype == RecordType.TOMBSTONE:
                stone = parse_tombstone(body)
                if stone is None:
                    raise RepositoryError("internal: a malformed tombstone")
                doc = self.index.read(lambda t, s=stone: self.index.get_rp(t, s.vm, s.id))
                if doc is not None:
                    seg.bury.append({"vm": stone.vm, "id": stone.id, "nonce": nonce_of(doc).hex()})
            else:
                raise RepositoryError(f"internal: {rtype.name} records are not facts")
        self.log.publish(seg)

    def flag_seqs(self, n: int) -> list[int]:
        """Protection sequence numbers all hosts order alike: the time in nanoseconds."""
        base = time.time_ns()
        return [base + i for i in range(n)]


def _open_cache(location: S3Location, config: RepoConfig) -> str:
    """This host's cache directory of the repository, created or checked to be its own."""
    cache = cache_dir_for(config.repository_id)
    mark = os.path.join(cache, CACHE_MARK)
    want = {"repository_id": config.repository_id, "url": location.url}
    try:
        if os.path.isfile(mark):
            with open(mark, "rb") as f:
                have = json.loads(f.read(65536))
            if have.get("repository_id") != config.repository_id:
                raise UsageError(
                    f"{cache}: is the cache of another repository ({have.get('url')}); "
                    "give another --cache-dir"
                )
            return cache
        # A mount still writing its chunk cache while the directory was deleted may leave
        # chunks/ behind: that much is ours, and starting afresh over it is safe.
        if os.path.isdir(cache) and set(os.listdir(cache)) - {CACHE_SUBDIR}:
            raise UsageError(f"{cache}: exists and is not a repofs cache; give another --cache-dir")
        make_dirs(os.path.join(cache, INDEX_DIR))
        set_aside(cache)
        write_file_atomic(os.path.join(cache, CONFIG_FILE), config.to_json())
        write_file_atomic(mark, json.dumps(want).encode())
    except (OSError, ValueError) as exc:
        if isinstance(exc, OSError):
            raise os_error(exc, cache) from None
        raise UsageError(f"{mark}: unreadable cache mark; remove {cache}") from None
    return cache


def _refuse_nested(location: S3Location) -> None:
    """Refuse a prefix inside another repository's (s3://B/repo/leases, s3://B/repo/x).

    Its objects would lie among that repository's leases, packs or log: gc
    there would take them for expired leases or leftover packs and delete them.
    """
    parts = location.prefix.split("/") if location.prefix else []
    for depth in range(len(parts)):
        outer = S3Location(location.bucket, "/".join(parts[:depth]))
        if Bucket(outer).head(CONFIG_FILE) is not None:
            raise UsageError(
                f"{location.url}: lies inside the repository {outer.url}; "
                "choose a prefix of its own"
            )


def _has_index(cache: str) -> bool:
    return os.path.exists(os.path.join(cache, INDEX_DIR, "data.mdb"))


def drop_cache(cache: str) -> None:
    """Remove a cache directory (rebuild-index on a bucket starts from nothing)."""
    with contextlib.suppress(FileNotFoundError):
        shutil.rmtree(cache)


def _pause_for_fault_tests() -> None:
    from repofs.store.repository import _pause_for_fault_tests as pause

    pause()


__all__ = ["BucketWriter", "ObjectStoreError", "S3Repository"]
