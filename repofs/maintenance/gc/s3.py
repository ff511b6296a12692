"""gc of a repository in a bucket: condemn now, delete once every lease that predates it ended.

Hosts that share a bucket share no lock, so gc cannot stop an ingest on
another host, nor see its process.  It works with facts in the bucket's log
(:mod:`repofs.store.bucketlog`) and the leases writers keep
(:mod:`repofs.store.leases`), in two phases that may lie in two runs:

1. **condemn**: sync, mark from every live restore point, then one facts
   object condemns every pack with nothing live that no running writer may
   still name in its commit (``at``: the time ``T``)
   and introduces the new packs holding the live objects of sparse packs,
   which it condemns too.  An ingest that starts after ``T`` syncs after
   it and never deduplicates against a condemned object.
2. **delete**: a pack condemned at ``T`` goes once ``T + ttl`` has passed
   and no lease that started before ``T + skew`` is alive: such an ingest
   may have deduplicated against it.  Leases are listed *before* the sync
   that decides, so an ingest whose lease is gone from the listing has its
   commit in the sync.  A live restore point that still needs an object
   only a condemned pack holds gets it copied into a new pack, introduced
   by the same facts object that retires the pack; then the pack is deleted.

Beside them: leftover packs (uploaded, never introduced: a killed ingest)
go once older than ``ttl + skew`` with no lease alive that started before
them; expired leases go; and after a checkpoint, log objects it covers
that are older than the log's grace period go, and all checkpoints but the
newest two.  ``docs/maintenance.md`` ("On object storage") has why the
waits suffice.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from typing import Any

from repofs.errors import IntegrityError, RepofsError
from repofs.maintenance.gc.common import GcResult, _describe, _pause
from repofs.maintenance.gc.compact import _PackUse, _read_live, _scan
from repofs.maintenance.gc.mark import Marker
from repofs.store.bucketlog import LOG_PREFIX, log_grace
from repofs.store.leases import Lease, LeaseInfo, clock_skew, lease_ttl, list_leases
from repofs.store.records import RECORD_HEADER_SIZE, RecordType, decode_header, decode_payload
from repofs.store.s3packs import S3PackStore
from repofs.store.s3repo import BucketWriter, S3Repository
from repofs.store.schema import (
    Location,
    decode_condemned,
    decode_doomed,
    decode_location,
    key_digest,
    key_type,
)
from repofs.store.segment import Segment

#: Packs below this size are merged when there are enough of them (as on a local repository).
SMALL_PACK = 1024 * 1024
SMALL_PACKS_TO_MERGE = 8
COMMIT_PREFIX = LOG_PREFIX + "c-"


@dataclass
class _Listing:
    """The bucket's packs and leases, listed before a sync (the order the proof needs)."""

    at: float  #: taken before listing: leases are judged alive as of then
    packs: dict[bytes, tuple[int, float]]  #: pack id -> (size, LastModified)
    leases: list[LeaseInfo]

    def holders(self, own: str | None, before: float) -> list[LeaseInfo]:
        """Alive leases (not ``own``) that started before ``before`` plus the clock skew."""
        skew = clock_skew()
        return [
            lease
            for lease in self.leases
            if lease.name != own and lease.alive(self.at, skew) and lease.started < before + skew
        ]


def _list(repo: S3Repository) -> _Listing:
    at = time.time()
    packs = {p: (size, mtime) for p, size, mtime in S3PackStore(repo.bucket).list_sized()}
    leases = list(list_leases(repo.bucket, repo.keys))  # after the packs: see the proof
    return _Listing(at, packs, leases)


def collect_bucket(repo: S3Repository, *, threshold: float, dry_run: bool, t0: float) -> GcResult:
    """Both phases, leftovers, expired leases and the log, under a lease of gc's own."""
    result = GcResult(dry_run=dry_run)
    lease = None if dry_run else Lease(repo.bucket, repo.keys, "gc").start()
    own = lease.name if lease is not None else None
    try:
        first = _list(repo)  # before the sync that decides about leftovers
        with repo.lock():  # this host's cache lock, then a sync
            marker = Marker(repo)
            result.restore_points = marker.mark_all()
            marker.check()
            result.mark_seconds = time.monotonic() - t0
            uses = _uses(repo, marker)
            result.packs_before = len(uses)
            dead, sparse = _plan(uses, threshold)
            # A running ingest introduces its packs before its commit (every 32): dead
            # until then, they are left alone while a writer older than them runs.
            dead = {
                p for p in dead if p in first.packs and not first.holders(own, first.packs[p][1])
            }
            result.packs_condemned = len(dead) + len(sparse)
            result.packs_rewritten = len(sparse)
            if not dry_run:
                _condemn(repo, uses, dead, sparse, result, lease)
            _pause("gc condemned")
            second = _list(repo)  # before the sync that decides about condemned packs
            repo.sync()
            result.late_restore_points = marker.mark_all()
            marker.check()
            gone = _delete_condemned(repo, marker, second, lease, result, dry_run)
            _delete_leftovers(repo, first, second, own, gone, result, dry_run)
            _delete_expired_leases(repo, second, own, result, dry_run)
            _compact_log(repo, second, own, result, dry_run)
        result.pages = marker.walker.pages_loaded
        result.live_objects = len(marker.live)
        result.warnings = marker.warnings + result.warnings
    finally:
        if lease is not None:
            lease.end()
    result.seconds = time.monotonic() - t0
    return result


# -- phase 1: condemn ------------------------------------------------------------------


def _uses(repo: S3Repository, marker: Marker) -> dict[bytes, _PackUse]:
    """Live bytes per introduced pack; refuses if a live object is nowhere in the cache."""
    uses, missing = _scan(repo, marker.live)
    if missing:
        index = repo.index
        missing = index.read(lambda t: [k for k in missing if index.get(t, "condemned", k) is None])
    if missing:
        raise IntegrityError(
            f"gc stopped before deleting anything: {len(missing)} object(s) that restore "
            f"points reference are not in the index (first: {_describe(missing[0])}); run "
            "'repofs verify', and remove the damaged restore points with "
            "'repofs delete REPO VM ID...'"
        )
    return uses


def _plan(uses: dict[bytes, _PackUse], threshold: float) -> tuple[set[bytes], set[bytes]]:
    dead = {p for p, u in uses.items() if u.live_bytes == 0}
    sparse = {p for p, u in uses.items() if u.live_bytes and u.live_bytes < threshold * u.size}
    small = {p for p, u in uses.items() if u.live_bytes and p not in sparse and u.size < SMALL_PACK}
    if len(small) >= SMALL_PACKS_TO_MERGE:
        sparse |= small  # every ingest ends with a small pack holding its record
    return dead, sparse


def _keys_in(repo: S3Repository, pack_ids: set[bytes]) -> dict[bytes, list[str]]:
    """Every object key with a location in one of ``pack_ids`` (live or condemned), as hex."""
    found = repo.index.read(lambda t: repo.log.keys_in_packs(t, pack_ids))
    return {p: [k.hex() for k in keys] for p, keys in found.items()}


def _condemn(
    repo: S3Repository,
    uses: dict[bytes, _PackUse],
    dead: set[bytes],
    sparse: set[bytes],
    result: GcResult,
    lease: Lease | None,
) -> None:
    """One facts object: the copies of sparse packs introduced, and every pack condemned."""
    copied, introduced = _copy_sparse(repo, uses, sparse, result)
    result.packs_rewritten = len(copied)
    doomed = dead | copied
    if not doomed:
        return
    keys = _keys_in(repo, doomed)
    at = math.ceil(time.time())
    seg = Segment(
        "facts",
        packs=introduced,
        condemn=[{"pack": p.hex(), "keys": keys[p], "at": at} for p in sorted(doomed)],
    )
    _check(lease, seg)
    repo.log.publish(seg)
    result.packs_condemned = len(dead | copied)


def _copy_sparse(
    repo: S3Repository, uses: dict[bytes, _PackUse], sparse: set[bytes], result: GcResult
) -> tuple[set[bytes], list]:
    """The live records of sparse packs, verified and copied verbatim into new packs.

    The new packs stay out of the cache until the facts object that
    condemns their sources introduces them: until then they are leftovers
    that gc's own lease protects.
    """
    if not sparse:
        return set(), []
    writer = repo.writer()
    assert isinstance(writer, BucketWriter)
    copied: set[bytes] = set()
    try:
        for pack_id in sorted(sparse):
            try:
                records = _read_live(repo.packs, pack_id, uses[pack_id], repo.keys)
            except IntegrityError as exc:
                result.warnings.append(f"pack {pack_id.hex()} kept as it is: {exc}")
                continue
            for key, codec, raw_len, payload in records:
                writer.put(RecordType(key_type(key)), key_digest(key), codec, raw_len, payload)
            copied.add(pack_id)
            _pause()
        writer.flush()
    except BaseException:
        writer.abort()
        raise
    result.bytes_written += writer.bytes_stored
    return copied, list(writer.introduced)


# -- phase 2: delete -------------------------------------------------------------------


def _delete_condemned(
    repo: S3Repository,
    marker: Marker,
    listing: _Listing,
    lease: Lease | None,
    result: GcResult,
    dry_run: bool,
) -> set[bytes]:
    """Retire and delete the condemned packs no writer that predates their condemnation uses."""
    index = repo.index
    ttl = lease_ttl()
    doomed = index.read(lambda t: [(p, decode_doomed(v)) for p, v in index.items(t, "doomed")])
    own = lease.name if lease is not None else None
    ready: dict[bytes, int] = {}
    for pack_id, (_size, _count, at) in doomed:
        if at == 0 or listing.at <= at + ttl or listing.holders(own, at):
            result.packs_held += 1
            continue
        ready[pack_id] = listing.packs.get(pack_id, (0, 0.0))[0]  # 0: gone already
    if not ready:
        return set()
    rescue = _needed(repo, marker, set(ready))
    result.objects_rescued = sum(len(v) for v in rescue.values())
    if dry_run:
        result.packs_deleted += sum(1 for p in ready if p in listing.packs)
        result.bytes_freed += sum(ready.values())
        return set(ready)
    writer = repo.writer()
    assert isinstance(writer, BucketWriter)
    try:
        for pack_id in sorted(rescue):
            try:
                for key, loc in rescue[pack_id]:
                    _copy_record(repo, writer, key, loc)
            except IntegrityError as exc:
                result.warnings.append(
                    f"condemned pack {pack_id.hex()} kept: a live object in it is unreadable: {exc}"
                )
                del ready[pack_id]
        writer.flush()
    except BaseException:
        writer.abort()
        raise
    result.bytes_written += writer.bytes_stored
    if not ready:
        return set()
    keys = _keys_in(repo, set(ready))
    seg = Segment(
        "facts",
        packs=list(writer.introduced),
        retire=[{"pack": p.hex(), "keys": keys[p]} for p in sorted(ready)],
    )
    _check(lease, seg)
    repo.log.publish(seg)  # every host forgets them before any is deleted
    for pack_id, size in sorted(ready.items()):
        if pack_id in listing.packs:
            repo.packs.delete(pack_id)
            result.packs_deleted += 1
            result.bytes_freed += size
    return set(ready)


def _check(lease: Lease | None, seg: Segment) -> None:
    """Introduce new packs only while gc's lease holds: without it, another gc may have
    deleted them as leftovers."""
    if lease is not None and seg.packs:
        lease.check()


def _needed(
    repo: S3Repository, marker: Marker, packs: set[bytes]
) -> dict[bytes, list[tuple[bytes, Location]]]:
    """Live objects whose only copy lies in one of ``packs``: an ingest that predates the
    condemnation deduplicated against them and committed since."""
    index = repo.index
    out: dict[bytes, list[tuple[bytes, Location]]] = {}

    def txn_fn(txn: Any) -> None:
        for db, decode in (("objects", decode_location), ("condemned", _condemned_loc)):
            for key, value in index.items(txn, db):
                loc = decode(value)
                if loc.pack_id in packs and key in marker.live:
                    out.setdefault(loc.pack_id, []).append((key, loc))

    index.read(txn_fn)
    return out


def _copy_record(repo: S3Repository, writer: BucketWriter, key: bytes, loc: Location) -> None:
    """One record, read by range, verified, and appended verbatim."""
    data = repo.packs.read(loc.pack_id, loc.offset, RECORD_HEADER_SIZE + loc.stored_len)
    where = f"pack {loc.pack_id.hex()} offset {loc.offset}"
    hdr = decode_header(data[:RECORD_HEADER_SIZE], where)
    if hdr.type != key_type(key) or hdr.digest != key_digest(key):
        raise IntegrityError(f"{where}: holds another object than the index says")
    payload = data[RECORD_HEADER_SIZE:]
    decode_payload(hdr, payload, where, repo.keys)
    writer.put(RecordType(hdr.type), hdr.digest, hdr.codec, hdr.raw_len, bytes(payload))


# -- leftovers, leases, the log ----------------------------------------------------------


def _delete_leftovers(
    repo: S3Repository,
    first: _Listing,
    second: _Listing,
    own: str | None,
    gone: set[bytes],
    result: GcResult,
    dry_run: bool,
) -> None:
    """Packs no fact introduced (killed writers), and retired packs a killed gc left."""
    index = repo.index
    known = index.read(
        lambda t: {db: {k for k, _ in index.items(t, db)} for db in ("packs", "doomed", "retired")}
    )
    limit = first.at - lease_ttl() - clock_skew()
    for pack_id, (size, mtime) in sorted(first.packs.items()):
        if any(pack_id in known[db] for db in known):
            continue
        if mtime >= limit or first.holders(own, mtime):
            continue  # a writer that may still introduce it runs, or ran not long ago
        result.orphan_packs += 1
        result.bytes_freed += size
        if not dry_run:
            repo.packs.delete(pack_id)
    for pack_id, (size, _mtime) in sorted(second.packs.items()):
        # Retired by a gc killed before its DELETE: the retire fact is out, nobody reads it.
        if pack_id in known["retired"] and pack_id not in gone:
            result.packs_deleted += 1
            result.bytes_freed += size
            if not dry_run:
                repo.packs.delete(pack_id)


def _delete_expired_leases(
    repo: S3Repository, listing: _Listing, own: str | None, result: GcResult, dry_run: bool
) -> None:
    skew = clock_skew()
    for lease in listing.leases:
        if lease.name != own and not lease.alive(listing.at, skew):
            result.leases_removed += 1
            if not dry_run:
                with contextlib.suppress(RepofsError):
                    repo.bucket.delete(lease.name)


def _compact_log(
    repo: S3Repository, listing: _Listing, own: str | None, result: GcResult, dry_run: bool
) -> None:
    """A checkpoint of what this run left, then the log objects and checkpoints it makes moot.

    A log object goes only when it is older than the grace period: a host
    that synced within half of it has applied it (see ``BucketLog.sync``).
    A commit object also stays while a writer that started before it runs:
    its name is what keeps an ingest that reserved the same id from
    committing it a second time.
    """
    log = repo.log
    if not dry_run and (log.uncovered or result.packs_condemned or result.packs_deleted):
        log.write_checkpoint()
    checkpoints = log.checkpoints()
    if not checkpoints:
        return
    try:
        covers = set(log.read_segment(checkpoints[-1].name).covers)
    except IntegrityError as exc:  # damaged: the log stays as it is ('repofs verify' names it)
        result.warnings.append(f"log not compacted: {exc}")
        return
    cutoff = time.time() - log_grace()
    for info in list(log.logs()):
        if info.name in covers and info.mtime < cutoff:
            if info.name.startswith(COMMIT_PREFIX) and listing.holders(own, info.mtime):
                continue
            result.logs_removed += 1
            if not dry_run:
                repo.bucket.delete(info.name)
    for info in checkpoints[:-2]:
        result.checkpoints_removed += 1
        if not dry_run:
            repo.bucket.delete(info.name)


def _condemned_loc(value: bytes) -> Location:
    return decode_condemned(value)[0]
