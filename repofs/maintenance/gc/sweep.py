"""gc's sweep: late marks, tombstones, and the one transaction that condemns, then the purge.

Step 3 of gc (see :mod:`repofs.maintenance.gc`): the transaction no commit
can pass, which moves dead objects to ``condemned`` and their packs to
``doomed`` without stopping any ingest.
"""

from __future__ import annotations

import os
import shutil

import lmdb

from repofs.errors import IntegrityError
from repofs.maintenance.gc.common import _KEPT, GcResult, _describe, _pause, _size
from repofs.maintenance.gc.compact import _scan
from repofs.maintenance.gc.leftovers import (
    _cleanup_unpublished,
    _refuse_if_index_is_behind,
    unindexed_packs,
    unlisted_restore_points,
)
from repofs.maintenance.gc.mark import Marker
from repofs.maintenance.gc.orphans import _tombstone_orphans
from repofs.maintenance.gc.purge import _purge
from repofs.maintenance.gc.writers import _drop_stale_writers
from repofs.store.repository import NEW_INDEX_DIR, Repository
from repofs.store.revive import revivals
from repofs.store.schema import (
    decode_pack_info,
    encode_condemned,
    encode_doomed,
    key_type,
    location_pack_id,
)


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
            pack_id = location_pack_id(value)
            used.add(pack_id)
            if pack_id in doomed:
                if key in live or key_type(key) in _KEPT:
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
            if location_pack_id(raw) in doomed:
                spared.add(location_pack_id(raw))
        gone = doomed - spared
        if revivals(txn, index.dbs["meta"]) != revived:
            # A commit brought condemned objects back into a pack doomed now, and its restore
            # point may be pruned already: no index entry may point into a pack to delete.
            dead[:] = [k for k, v in index.items(txn, "objects") if location_pack_id(v) in gone]
        for key in dead:
            raw = index.get(txn, "objects", key)
            if raw is not None and location_pack_id(raw) in gone and key not in live:
                index.delete(txn, "objects", key)
                index.put(txn, "condemned", key, encode_condemned(raw, gen))
        for pack_id in gone:
            info = index.get(txn, "packs", pack_id)
            if info is not None:
                index.delete(txn, "packs", pack_id)
                size, count = decode_pack_info(info)
                index.put(txn, "doomed", pack_id, encode_doomed(size, count, gen))
        for pack_id in unindexed:  # maybe a running writer's, between publishing and indexing
            listed = index.get(txn, "packs", pack_id) or index.get(txn, "doomed", pack_id)
            if listed is None:
                index.put(txn, "doomed", pack_id, encode_doomed(_size(repo.packs, pack_id), 0, gen))
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
