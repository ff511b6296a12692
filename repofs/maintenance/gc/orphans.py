"""Tombstones for restore point records that were never committed (their ingest was killed).

Without them rebuild-index would bring back, as incomplete restore points,
records whose data gc deleted; also used by prune (``buried_restore_points``).
"""

from __future__ import annotations

import contextlib
from typing import Any

import lmdb

from repofs.errors import IntegrityError, NoSpaceError
from repofs.maintenance.gc.common import _TOMB, GcResult
from repofs.maintenance.gc.mark import Marker
from repofs.maintenance.gc.writers import _running
from repofs.maintenance.packscan import restore_point_records
from repofs.store.records import RecordType
from repofs.store.repository import Repository
from repofs.store.rprecords import Tombstone, parse_rp_record, parse_tombstone
from repofs.store.schema import key_digest, type_prefix


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
    rp_type = type_prefix(RecordType.RESTORE_POINT)
    live = marker.live if marker is not None else set()

    def keys(txn: lmdb.Transaction) -> tuple[list[bytes], list[bytes]]:
        records = [k for k, _ in index.items(txn, "objects", rp_type) if k not in live]
        records += [k for k, _ in index.items(txn, "condemned", rp_type)]
        tombs = [k for k, _ in index.items(txn, "objects", type_prefix(_TOMB))]
        return records, tombs

    records, tombs = index.read(keys)
    found = [
        doc
        for p in packs
        for _d, doc in restore_point_records(
            repo.packs, p, repo.config.repository_id, repo.keys
        )
    ]
    if not records and not found:
        return True
    buried = _buried(repo, tombs)
    docs = []
    for key in records:
        try:
            doc = parse_rp_record(repo.read_object(RecordType.RESTORE_POINT, key_digest(key)))
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
            t = parse_tombstone(repo.read_object(_TOMB, key_digest(key)))
            if t is not None:
                buried.add(t.target)
    return buried


def buried_restore_points(repo: Repository) -> set[tuple[str, str, int]]:
    """(vm, id, seq) of every restore point a readable, indexed tombstone names."""
    tombs = repo.index.read(
        lambda t: [k for k, _ in repo.index.items(t, "objects", type_prefix(_TOMB))]
    )
    return _buried(repo, tombs)
