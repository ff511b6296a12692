"""``repofs gc``: mark from every live restore point, then condemn and delete, beside ingests.

gc holds the repository *shared* from start to end: it never stops an
ingest, a prune, a verify or a mount (``docs/maintenance.md`` has the
argument, and how it carries over to object storage).

1. **mark**: walk the maps of every committed restore point, each distinct
   page once; everything they reach is live, with their config blobs, their
   own records, every tombstone and every protection record.  A referenced
   object that is missing or unreadable stops gc before anything is
   written: sweeping then could destroy the only copy of data that a
   rebuilt index would find again.
2. **plan and copy**: per pack, the bytes of live objects.  Packs with
   nothing live are doomed; packs below the threshold have their live
   records copied, verbatim and verified, into new packs, which are
   published and indexed (one LMDB transaction per new pack) first.
3. **condemn**: mark the restore points committed since phase 1 (an ingest
   may have deduplicated against an object that looked dead) and spare
   every doomed pack that now holds a live object; tombstone restore point
   records that were never committed (killed ingests, not running ones);
   then one transaction, which no commit can pass, marks what was committed
   meanwhile, bumps the gc generation, moves the doomed packs' objects from
   ``objects`` to ``condemned`` and the packs from ``packs`` to ``doomed``,
   records the packs the index does not know in ``doomed`` too, and drops
   the reservations and leases of processes that are gone.
4. **purge**: what was condemned at a generation that no running ingest,
   prune or verify predates is forgotten, and only then are the files
   deleted; the rest waits for a later gc.  An ingest that predates a
   generation brings back in its commit what it references
   (:mod:`repofs.store.revive`).

A kill at any moment leaves either the old pack or the new index entry (or
both): never an index entry without its data.  Mount readers need no lock:
a read that finds its pack gone asks the index again (see
``Repository.read_object``) and gets the moved object or a clean EIO.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import lmdb

from repofs.errors import BusyError, IntegrityError, NoSpaceError, UsageError
from repofs.maintenance.packscan import restore_point_records
from repofs.store.crypto import Keys
from repofs.store.index import (
    DOOMED,
    LOCATION,
    PACK_INFO,
    U64,
    Index,
    Location,
    object_key,
)
from repofs.store.lock import open_lock_file
from repofs.store.mapwalk import MapWalker
from repofs.store.packstore import PackStore
from repofs.store.records import (
    RECORD_HEADER_SIZE,
    ZERO_DIGEST,
    Codec,
    RecordType,
    decode_header,
    decode_payload,
)
from repofs.store.repository import NEW_INDEX_DIR, Repository
from repofs.store.reserve import gave_up_warning, retry_with_reserve, set_aside
from repofs.store.restorepoint import RestorePoint
from repofs.store.revive import revivals
from repofs.store.rprecords import Tombstone, parse_rp_record, parse_tombstone, rp_record_digest

GC_LOCK = "lock.gc"
DEFAULT_THRESHOLD = 0.5
SMALL_PACK = 1024 * 1024
SMALL_PACKS_TO_MERGE = 8
#: Fault-injection hook for tests, unset in production: seconds to sleep between gc steps,
#: so that a kill -9 at a random moment can land in every phase.
DELAY_ENV = "REPOFS_TEST_GC_DELAY"
_TOMB = RecordType.TOMBSTONE
#: Record types gc keeps forever: what rebuild-index needs to know beside restore point records.
_KEPT = frozenset({RecordType.TOMBSTONE, RecordType.PROTECTION})


@dataclass
class GcResult:
    dry_run: bool = False
    restore_points: int = 0
    late_restore_points: int = 0  #: committed while gc marked
    pages: int = 0
    live_objects: int = 0
    packs_before: int = 0
    packs_deleted: int = 0
    packs_rewritten: int = 0
    packs_spared: int = 0  #: doomed, but an ingest deduplicated against them meanwhile
    packs_held: int = 0  #: condemned, left to a later gc: a writer that started before runs
    orphan_packs: int = 0
    bytes_freed: int = 0
    bytes_written: int = 0
    tmp_freed: int = 0
    tombstones_written: int = 0
    reservations_removed: int = 0
    mark_seconds: float = 0.0
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """``gc --json``: every field, and ``freed``, the net bytes the text reports freed."""
        return {"freed": max(self.bytes_freed - self.bytes_written, 0), **asdict(self)}


@dataclass
class _PackUse:
    size: int
    live_bytes: int = 0
    live: list[tuple[bytes, Location]] = field(default_factory=list)


class Marker:
    """The live set: object keys reached from restore points, each shared page walked once."""

    def __init__(self, repo: Repository) -> None:
        self.repo = repo
        self.live: set[bytes] = set()
        self.marked: set[tuple[str, str, int]] = set()
        self.walker = MapWalker(repo.config.page_refs, self._load_page)
        self.warnings: list[str] = []
        self._chunk = bytes((RecordType.CHUNK,))
        #: set while marking inside gc's write transaction (no read transaction may nest there)
        self._txn: lmdb.Transaction | None = None

    def _load_page(self, digest: bytes) -> bytes:
        if self._txn is None:
            return self.repo.read_object(RecordType.PAGE, digest)
        loc = self.repo.index.locate(RecordType.PAGE, digest, self._txn)
        if loc is None:
            raise IntegrityError(f"page {digest.hex()} is not in the index")
        return self.repo.read_at(RecordType.PAGE, digest, loc)

    def _indexed(self, key: bytes) -> bool:
        if self._txn is not None:
            return self.repo.index.get(self._txn, "objects", key) is not None
        return self.repo.index.read(lambda t: self.repo.index.get(t, "objects", key)) is not None

    def _on_chunks(self, page: bytes, _first: int) -> None:
        live, prefix = self.live, self._chunk
        for k in range(0, len(page), 32):
            ref = page[k : k + 32]
            if ref != ZERO_DIGEST:
                live.add(prefix + ref)

    def mark(self, doc: dict[str, Any]) -> None:
        rp = RestorePoint.from_doc(doc)
        self.marked.add((rp.vm, rp.id, rp.seq))
        record = object_key(RecordType.RESTORE_POINT, rp_record_digest(doc, self.repo.keys))
        if self._indexed(record):
            self.live.add(record)
        else:
            self.warnings.append(
                f"restore point {rp.vm}/{rp.id} has no record of its own in the "
                "packs: rebuild-index could not restore it"
            )
        for cfg in rp.configs:
            self.live.add(object_key(RecordType.BLOB, bytes.fromhex(cfg.digest)))
        for disk in rp.disks:
            self.walker.walk(disk.map, self._on_chunks)

    def mark_all(self, txn: lmdb.Transaction | None = None) -> int:
        """Mark every committed restore point not marked yet; returns how many were new.

        With ``txn`` (gc's condemning transaction) it reads through that
        transaction, so the restore points it sees are exactly the committed ones.
        """
        index = self.repo.index
        if txn is None:
            docs = index.read(lambda t: list(index.rp_docs(t)))
        else:
            docs = list(index.rp_docs(txn))
        new = 0
        self._txn = txn
        try:
            for doc in docs:
                if (doc["vm"], doc["id"], doc["seq"]) not in self.marked:
                    self.mark(doc)
                    new += 1
        finally:
            self._txn = None
        self.absorb_pages()
        return new

    def absorb_pages(self) -> None:
        """Add every page the walker visited to the live set."""
        page = bytes((RecordType.PAGE,))
        self.live.update(page + key[:32] for key in self.walker.seen)

    def check(self) -> None:
        """Refuse to sweep from a mark that could not see everything."""
        faults = self.walker.faults
        if faults:
            f = faults[0]
            raise IntegrityError(
                f"gc stopped before deleting anything: {len(faults)} map page(s) of live restore "
                f"points are missing or damaged (first: {f.message}); run 'repofs verify', and "
                "remove the damaged restore points with 'repofs delete REPO VM ID...' "
                "or rebuild the index"
            )


def collect_garbage(
    path: str, *, threshold: float = DEFAULT_THRESHOLD, dry_run: bool = False
) -> GcResult:
    """Mark, copy, condemn and delete, all under the shared lock: ingests never wait for gc."""
    if not 0 <= threshold <= 1:
        raise UsageError(f"--threshold {threshold * 100:g} must be a percentage from 0 to 100")
    t0 = time.monotonic()
    result = GcResult(dry_run=dry_run)
    with Repository.open(path) as repo, _gc_lock(path):
        _pause("gc opened the index")  # a rebuild-index may replace it before we hold the lock
        with repo.lock():  # from here on no rebuild-index can replace the index under us
            marker = Marker(repo)
            result.restore_points = marker.mark_all()
            marker.check()
            result.mark_seconds = time.monotonic() - t0
            uses, missing = _scan(repo, marker.live)
            if missing:
                raise IntegrityError(
                    f"gc stopped before deleting anything: {len(missing)} object(s) that restore "
                    f"points reference are not in the index (first: {_describe(missing[0])}); run "
                    "'repofs verify', and remove the damaged restore points with "
                    "'repofs delete REPO VM ID...' or rebuild the index"
                )
            result.packs_before = len(uses)
            doomed = {p for p, u in uses.items() if u.live_bytes == 0}
            sparse = {
                p for p, u in uses.items() if u.live_bytes and u.live_bytes < threshold * u.size
            }
            small = {
                p
                for p, u in uses.items()
                if u.live_bytes and p not in sparse and u.size < SMALL_PACK
            }
            if len(small) >= SMALL_PACKS_TO_MERGE:
                sparse |= small  # every ingest ends with a tiny pack holding its record
            if dry_run:
                unindexed = unindexed_packs(repo)
                _refuse_if_index_is_behind(unlisted_restore_points(repo, unindexed))
                result.orphan_packs = len(unindexed)
                result.packs_deleted = len(doomed)
                result.packs_rewritten = len(sparse)
                result.bytes_freed = (
                    sum(uses[p].size for p in doomed)
                    + sum(uses[p].size - uses[p].live_bytes for p in sparse)
                    + sum(_size(repo.packs, p) for p in unindexed)
                )
                result.live_objects = len(marker.live)
                result.pages = marker.walker.pages_loaded
                result.warnings = marker.warnings
                result.seconds = time.monotonic() - t0
                return result
            copied = _copy(repo, uses, sparse, marker, result)
            doomed |= copied
            result.packs_rewritten = len(copied)
            _pause()
            # Safe to run again from the top: the sweep is built to survive a crash anywhere.
            _, held = retry_with_reserve(path, lambda: _sweep(repo, marker, doomed, result))
            if held:
                result.warnings.append(gave_up_warning(held, "sweep"))
        if not dry_run and (size := set_aside(path)):
            result.notes.append(f"set aside {size / 2**20:.1f} MiB as the repository's reserve")
        result.pages = marker.walker.pages_loaded
        result.live_objects = len(marker.live)
        result.warnings = marker.warnings + result.warnings
    result.seconds = time.monotonic() - t0
    return result


@contextlib.contextmanager
def _gc_lock(path: str) -> Iterator[None]:
    """One gc at a time; a second one fails at once rather than waiting for hours."""
    fd = open_lock_file(os.path.join(path, GC_LOCK))
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise BusyError("another gc is running on this repository") from None
        yield
    finally:
        os.close(fd)


def _pause(say: str | None = None) -> None:
    delay = os.environ.get(DELAY_ENV)
    if delay:
        if say:
            print(f"repofs: test hook: {say}, pausing", file=sys.stderr, flush=True)
        time.sleep(float(delay))


def _describe(key: bytes) -> str:
    return f"{RecordType(key[0]).name.lower()} {key[1:].hex()[:16]}"


def _scan(repo: Repository, live: set[bytes]) -> tuple[dict[bytes, _PackUse], list[bytes]]:
    """Live bytes and live objects per pack; and live keys the index lacks."""
    index = repo.index

    def txn_fn(txn: lmdb.Transaction) -> tuple[dict[bytes, _PackUse], int]:
        uses = {k: _PackUse(PACK_INFO.unpack(v)[0]) for k, v in index.items(txn, "packs")}
        found = 0
        for key, value in index.items(txn, "objects"):
            in_live = key in live
            if not (in_live or key[0] in _KEPT):
                continue
            found += in_live
            loc = Location(*LOCATION.unpack(value))
            use = uses.get(loc.pack_id)
            if use is not None:
                use.live_bytes += RECORD_HEADER_SIZE + loc.stored_len
                use.live.append((key, loc))
        return uses, found

    uses, found = index.read(txn_fn)
    missing: list[bytes] = []
    if found < len(live):
        with index.reading() as txn:
            missing = sorted(k for k in live if index.get(txn, "objects", k) is None)
    return uses, missing


def _copy(
    repo: Repository,
    uses: dict[bytes, _PackUse],
    sparse: set[bytes],
    marker: Marker,
    result: GcResult,
) -> set[bytes]:
    """Copy the live records of sparse packs into new packs; returns the packs fully copied.

    A source pack counts as copied only once every one of its records sits
    in a published new pack.  Running out of space ends copying early: the
    packs copied so far are still freed, and so are packs with nothing live.
    """
    writer = repo.writer()
    copied: set[bytes] = set()
    in_flight: list[bytes] = []
    moved_records: set[bytes] = set()
    try:
        for pack_id in sorted(sparse):
            try:
                records = _read_live(repo.packs, pack_id, uses[pack_id], repo.keys)
            except IntegrityError as exc:
                result.warnings.append(f"pack {pack_id.hex()} kept as it is: {exc}")
                continue
            published = len(writer.packs_published)
            for key, codec, raw_len, payload in records:
                writer.put(RecordType(key[0]), key[1:], codec, raw_len, payload)
                if key[0] == RecordType.RESTORE_POINT:
                    moved_records.add(key)
            if len(writer.packs_published) > published:  # everything put before this pack is out
                copied.update(in_flight)
                in_flight = []
            in_flight.append(pack_id)
            _pause()
        writer.flush()
        copied.update(in_flight)
    except NoSpaceError as exc:
        writer.abort()
        result.warnings.append(f"stopped rewriting packs: {exc}; freeing what is dead")
        # Only published packs were written; the aborted one is gone again.
        result.bytes_written += sum(repo.packs.size(p) for p in writer.packs_published)
    except BaseException:
        writer.abort()
        raise
    else:
        result.bytes_written += writer.bytes_stored
    if moved_records:
        _update_record_hints(repo, moved_records)
    return copied


def _read_live(
    store: PackStore, pack_id: bytes, use: _PackUse, keys: Keys
) -> list[tuple[bytes, Codec, int, bytes]]:
    """The live records of one pack, each verified before it is copied anywhere.

    A sealed record is copied as it is: its associated data binds the
    repository's content id, type and name, not the pack or offset.
    """
    data = memoryview(store.read(pack_id, 0, use.size))
    out = []
    for key, loc in sorted(use.live, key=lambda kl: kl[1].offset):
        where = f"pack {pack_id.hex()} offset {loc.offset}"
        end = loc.offset + RECORD_HEADER_SIZE + loc.stored_len
        hdr = decode_header(data[loc.offset : loc.offset + RECORD_HEADER_SIZE], where)
        if hdr.type != key[0] or hdr.digest != key[1:]:
            raise IntegrityError(f"{where}: holds another object than the index says")
        payload = data[loc.offset + RECORD_HEADER_SIZE : end]
        decode_payload(hdr, payload, where, keys)
        out.append((key, hdr.codec, hdr.raw_len, bytes(payload)))
    return out


def _update_record_hints(repo: Repository, moved: set[bytes]) -> None:
    """Point the ``record`` hint of restore points at their moved records (informational only)."""
    index = repo.index

    def txn_fn(txn: lmdb.Transaction) -> None:
        for key, doc in list(index.rp_items(txn)):
            record = object_key(RecordType.RESTORE_POINT, rp_record_digest(doc, repo.keys))
            if record in moved:
                raw = index.get(txn, "objects", record)
                if raw is not None:
                    loc = Location(*LOCATION.unpack(raw))
                    doc["record"] = [loc.pack_id.hex(), loc.offset]
                    index.put_rp_doc(txn, key, doc)

    index.write(txn_fn)


def _sweep(repo: Repository, marker: Marker, doomed: set[bytes], result: GcResult) -> None:
    """Late marks, tombstones, the condemning transaction, the purge, then file deletions.

    No ingest is stopped: what an ingest still running may use is condemned
    (taken out of ``objects`` and ``packs``, so nothing new deduplicates
    against it) but its files stay until no writer that was running then
    is left; such an ingest brings back in its commit what it references
    (:mod:`repofs.store.revive`).  ``docs/maintenance.md`` has the proof.
    """
    index = repo.index
    index.check_current()  # never act on an index that rebuild-index replaced
    result.late_restore_points = marker.mark_all()
    marker.check()
    _, missing = _scan(repo, marker.live)
    if missing:
        raise IntegrityError(
            f"gc stopped before deleting anything: {len(missing)} object(s) referenced by restore "
            f"points committed during gc are not in the index (first: {_describe(missing[0])})"
        )
    unindexed = unindexed_packs(repo)
    _refuse_if_index_is_behind(unlisted_restore_points(repo, unindexed))
    _tombstone_orphans(repo, marker, result, unindexed)

    # Doomed packs that hold a live object (a late restore point deduplicated into them) are
    # spared; the rest of their objects are the ones to condemn.  Read first, checked again
    # in the write transaction below for anything that changed since.
    live = marker.live

    def plan(txn: lmdb.Transaction) -> tuple[set[bytes], list[bytes], int]:
        keep, dead = set(), []
        for key, value in index.items(txn, "objects"):
            pack_id = value[:16]
            used.add(pack_id)
            if pack_id in doomed:
                if key in live or key[0] in _KEPT:
                    keep.add(pack_id)
                else:
                    dead.append(key)
        return keep, dead, revivals(txn, index.dbs["meta"])

    used: set[bytes] = set()  #: packs that index entries point into
    spared, dead, revived = index.read(plan)
    # Not indexed, but entries point into it (its own entry lost): never a leftover.
    unindexed = [p for p in unindexed if p not in used]

    def condemn(txn: lmdb.Transaction) -> tuple[int, int, set[bytes]]:
        gen = index.gc_generation(txn) + 1
        # Restore points committed since the late mark: mark them in this transaction, which
        # no commit can pass, and spare the packs of what they reach.
        before = set(live)
        late = marker.mark_all(txn)
        marker.check()
        for key in live - before:
            raw = index.get(txn, "objects", key)
            if raw is None:
                raise IntegrityError(
                    f"gc stopped before deleting anything: {_describe(key)}, referenced by a "
                    "restore point committed during gc, is not in the index"
                )
            if raw[:16] in doomed:
                spared.add(raw[:16])
        gone = doomed - spared
        if revivals(txn, index.dbs["meta"]) != revived:
            # A commit brought condemned objects back into a pack doomed now, and its restore
            # point may be pruned already: no index entry may point into a pack to delete.
            dead[:] = [k for k, v in index.items(txn, "objects") if v[:16] in gone]
        for key in dead:
            raw = index.get(txn, "objects", key)
            if raw is not None and raw[:16] in gone and key not in live:
                index.delete(txn, "objects", key)
                index.put(txn, "condemned", key, raw + U64.pack(gen))
        for pack_id in gone:
            info = index.get(txn, "packs", pack_id)
            if info is not None:
                index.delete(txn, "packs", pack_id)
                size, count = PACK_INFO.unpack(info)
                index.put(txn, "doomed", pack_id, DOOMED.pack(size, count, gen))
        for pack_id in unindexed:  # maybe a running writer's, between publishing and indexing
            listed = index.get(txn, "packs", pack_id) or index.get(txn, "doomed", pack_id)
            if listed is None:
                index.put(txn, "doomed", pack_id, DOOMED.pack(_size(repo.packs, pack_id), 0, gen))
        index.set_gc_generation(txn, gen)
        return late, _drop_stale_writers(index, txn), gone

    late, result.reservations_removed, gone = index.write(condemn)
    result.late_restore_points += late
    result.packs_spared = len(doomed) - len(gone)
    _pause()
    _purge(repo, result)
    result.tmp_freed = _cleanup_unpublished(repo)
    half_built = os.path.join(repo.path, NEW_INDEX_DIR)  # a killed rebuild-index's; we hold
    if os.path.isdir(half_built):  # the shared lock, so no rebuild is running
        result.tmp_freed += sum(
            os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(half_built) for f in fs
        )
        shutil.rmtree(half_built, ignore_errors=True)
    result.bytes_freed += result.tmp_freed


def _purge(repo: Repository, result: GcResult) -> None:
    """Forget condemned objects and delete doomed packs that no running writer can still use.

    A condemned object or doomed pack of generation G can matter only to a
    writer that was running at G: one whose reservation or lease carries a
    generation below G.  Once none is left, no one will index or read them
    any more.  A doomed pack the index never knew goes first, file before
    entry: its entry is what tells it from a pack of restore points the
    index lost, once the reservation of the killed ingest that wrote it is
    gone (a doomed pack its writer indexed after all is only forgotten).
    Then one transaction forgets the rest, and only after it is durable are
    their files deleted: a kill in between leaves packs that the index does
    not know and that hold only records it has or tombstones.
    """
    index = repo.index

    def leftovers(txn: lmdb.Transaction) -> list[bytes]:
        oldest = _oldest_writer(index, txn)
        return [
            pack_id
            for pack_id, value in index.items(txn, "doomed")
            if DOOMED.unpack(value)[1] == 0  # never indexed: an indexed pack has a record
            and DOOMED.unpack(value)[2] <= oldest
            and index.get(txn, "packs", pack_id) is None
        ]

    index.check_current()  # belt and braces: under the shared lock no rebuild can run
    # Ingests that died since the first round leave records no tombstone names yet.
    doomed_unindexed = index.read(
        lambda t: [p for p, v in index.items(t, "doomed") if DOOMED.unpack(v)[1] == 0]
    )
    _tombstone_orphans(repo, None, result, doomed_unindexed)
    unindexed = index.read(leftovers)
    for pack_id in unindexed:
        result.bytes_freed += _size(repo.packs, pack_id)
        repo.packs.delete(pack_id)
        result.orphan_packs += 1
        _pause()
    gone = set(unindexed)

    def forget(txn: lmdb.Transaction) -> tuple[list[bytes], int]:
        oldest = _oldest_writer(index, txn)  # only newer writers since: none below it
        for key, value in list(index.items(txn, "condemned")):
            if U64.unpack(value[-8:])[0] <= oldest:
                index.delete(txn, "condemned", key)
        out, held = [], 0
        for pack_id, value in list(index.items(txn, "doomed")):
            _size_of, count, gen = DOOMED.unpack(value)
            indexed = index.get(txn, "packs", pack_id) is not None
            if gen > oldest or (count == 0 and not indexed and pack_id not in gone):
                held += 1  # (an unindexed one that qualified only now: the next gc)
                continue
            index.delete(txn, "doomed", pack_id)
            if count and not indexed:
                out.append(pack_id)
        return out, held

    doomed, result.packs_held = index.write(forget)
    for pack_id in sorted(doomed):
        result.bytes_freed += _size(repo.packs, pack_id)
        repo.packs.delete(pack_id)
        result.packs_deleted += 1
        _pause()


def _oldest_writer(index: Index, txn: lmdb.Transaction) -> int:
    """The oldest gc generation a running ingest or lease holder started in (huge if none)."""
    oldest = 1 << 63
    for db in ("reservations", "leases"):
        for _key, value in index.items(txn, db):
            try:
                doc = json.loads(value)
                pid, gen = int(doc["pid"]), int(doc.get("gen", 0))
            except (ValueError, KeyError, TypeError):
                continue
            if _alive(pid):
                oldest = min(oldest, gen)
    return oldest


def _cleanup_unpublished(repo: Repository) -> int:
    """Unfinished temporary packs of writers that are gone (their pid is in the name)."""
    tmp = repo.packs.tmp_dir
    try:
        names = os.listdir(tmp)
    except FileNotFoundError:
        return 0
    removed = 0
    for name in names:
        parts = name.split(".")
        with contextlib.suppress(ValueError, IndexError):
            if len(parts) >= 3 and _alive(int(parts[-2])):
                continue  # a running writer's pack being filled
        path = os.path.join(tmp, name)
        try:
            removed += os.stat(path).st_size
            os.unlink(path)
        except OSError:
            continue
    return removed


def _size(store: PackStore, pack_id: bytes) -> int:
    try:
        return store.size(pack_id)
    except IntegrityError:
        return 0


def _tombstone_orphans(
    repo: Repository,
    marker: Marker | None,
    result: GcResult,
    packs: list[bytes],
) -> bool:
    """Tombstone restore point records that were never committed (their ingest was killed).

    Without a tombstone, rebuild-index would bring such a restore point back
    after gc deleted data only it referenced, and call it incomplete.  The
    records are those indexed but not live, those condemned, and those in
    ``packs`` (unindexed: an ingest killed between publishing its last pack
    and indexing it).  Records of a running ingest are left alone: it may
    still commit.  Runs before gc condemns anything, and again before it
    purges anything (an ingest may have died in between).  Without space
    for the tombstones, the indexed orphans are marked live instead (given a
    ``marker``: before condemning) and False is returned; unindexed ones
    make it raise, so that nothing is deleted.
    """
    index = repo.index
    rp_type = bytes((RecordType.RESTORE_POINT,))
    live = marker.live if marker is not None else set()

    def keys(txn: lmdb.Transaction) -> tuple[list[bytes], list[bytes]]:
        records = [k for k, _ in index.items(txn, "objects", rp_type) if k not in live]
        records += [k for k, _ in index.items(txn, "condemned", rp_type)]
        tombs = [k for k, _ in index.items(txn, "objects", bytes((_TOMB,)))]
        return records, tombs

    records, tombs = index.read(keys)
    found = [
        doc
        for p in packs
        for _d, doc in restore_point_records(repo.packs, p, repo.config.repository_id, repo.keys)
    ]
    if not records and not found:
        return True
    buried = _buried(repo, tombs)
    docs = []
    for key in records:
        try:
            doc = parse_rp_record(repo.read_object(RecordType.RESTORE_POINT, key[1:]))
        except IntegrityError:
            continue  # unreadable: rebuild-index cannot resurrect it either
        if doc is not None:
            docs.append(doc)
    unindexed = {(d["vm"], d["id"], d["seq"]) for d in found}
    docs = [d for d in docs + found if (d["vm"], d["id"], d["seq"]) not in buried]

    def uncommitted(txn: lmdb.Transaction) -> list[dict[str, Any]]:
        """Records of neither a committed restore point nor a running ingest (it may commit)."""
        out = []
        for doc in docs:
            key = index.rp_key(doc["vm"], doc["id"])
            committed = index.get_rp(txn, doc["vm"], doc["id"])
            if committed is not None and committed.get("seq") == doc["seq"]:
                continue
            res = index.get(txn, "reservations", key)
            if res is not None and _running(res):
                continue
            out.append(doc)
        return out

    orphans = list({(d["vm"], d["id"], d["seq"]): d for d in index.read(uncommitted)}.values())
    if not orphans:
        return True
    writer = repo.writer()
    try:
        for doc in orphans:
            tomb = Tombstone(doc["vm"], doc["id"], doc["seq"], doc["vm_seq"])
            writer.put_new(_TOMB, tomb.body())
        writer.flush()
    except NoSpaceError as exc:
        writer.abort()
        if marker is None or any((d["vm"], d["id"], d["seq"]) in unindexed for d in orphans):
            raise
        result.warnings.append(
            f"kept {len(orphans)} uncommitted restore point record(s) and their "
            f"data: no space for their tombstones ({exc})"
        )
        for doc in orphans:
            marker.mark(doc)
        marker.absorb_pages()
        return False
    except BaseException:
        writer.abort()
        raise
    result.tombstones_written += len(orphans)
    result.bytes_written += writer.bytes_stored
    return True


def _buried(repo: Repository, tombs: list[bytes]) -> set[tuple[str, str, int]]:
    """The restore points that the tombstones (index keys) name."""
    buried = set()
    for key in tombs:
        with contextlib.suppress(IntegrityError):
            t = parse_tombstone(repo.read_object(_TOMB, key[1:]))
            if t is not None:
                buried.add(t.target)
    return buried


def buried_restore_points(repo: Repository) -> set[tuple[str, str, int]]:
    """(vm, id, seq) of every restore point a readable, indexed tombstone names."""
    tombs = repo.index.read(
        lambda t: [k for k, _ in repo.index.items(t, "objects", bytes((_TOMB,)))]
    )
    return _buried(repo, tombs)


def unindexed_packs(repo: Repository) -> list[bytes]:
    """Pack files the index lists neither as live nor as doomed (those a later gc deletes)."""
    index = repo.index

    def known(txn: lmdb.Transaction) -> set[bytes]:
        return {k for db in ("packs", "doomed") for k, _ in index.items(txn, db)}

    names = index.read(known)
    return [p for p in repo.packs.list() if p not in names]


def unlisted_restore_points(repo: Repository, pack_ids: list[bytes]) -> list[str]:
    """Restore points whose records lie in unindexed packs and that the index has never seen.

    Leftovers of a killed ingest or gc hold only records the index already
    has, or that a running ingest has reserved.  Anything else means the
    index is older than the packs (a restored copy, lost transactions): the
    unindexed packs then hold committed restore points and their data, and
    collecting them as leftovers would destroy those backups.
    """
    index = repo.index
    found = []
    for pack_id in pack_ids:
        found += restore_point_records(repo.packs, pack_id, repo.config.repository_id, repo.keys)
    if not found:
        return []

    def unknown(txn: lmdb.Transaction) -> list[dict[str, Any]]:
        return [
            doc
            for digest, doc in found
            if not index.has(txn, RecordType.RESTORE_POINT, digest)
            and index.get(txn, "reservations", index.rp_key(doc["vm"], doc["id"])) is None
        ]

    docs = index.read(unknown)
    if docs:
        tombs = index.read(lambda t: [k for k, _ in index.items(t, "objects", bytes((_TOMB,)))])
        buried = _buried(repo, tombs)
        docs = [d for d in docs if (d["vm"], d["id"], d["seq"]) not in buried]
    return sorted({f"{d['vm']}/{d['id']}" for d in docs})


def _refuse_if_index_is_behind(unlisted: list[str]) -> None:
    if unlisted:
        raise IntegrityError(
            f"gc stopped before deleting anything: packs the index does not know hold "
            f"{len(unlisted)} restore point(s) it does not list (first: {unlisted[0]}); the "
            "index is older than the packs: run 'repofs rebuild-index', then gc"
        )


def _drop_stale_writers(index: Index, txn: lmdb.Transaction) -> int:
    """Reservations and leases of writers whose process is gone."""
    dropped = 0
    for db in ("reservations", "leases"):
        stale = []
        for key, value in index.items(txn, db):
            try:
                pid = int(json.loads(value)["pid"])
            except (ValueError, KeyError, TypeError):
                stale.append(key)
                continue
            if not _alive(pid):
                stale.append(key)
        for key in stale:
            index.delete(txn, db, key)
        dropped += len(stale) if db == "reservations" else 0
    return dropped


def _running(reservation: bytes) -> bool:
    """Whether the ingest that holds this reservation is still running."""
    try:
        return _alive(int(json.loads(reservation)["pid"]))
    except (ValueError, KeyError, TypeError):
        return False


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
