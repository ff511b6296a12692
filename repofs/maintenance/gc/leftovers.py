"""What killed writers leave behind: packs the index does not know, unfinished temporary packs.

An unindexed pack is a leftover only if the index already knows every
restore point whose record it holds; otherwise the index is older than the
packs and gc refuses to run (verify reports the same).
"""

from __future__ import annotations

from typing import Any

import lmdb

from repofs.errors import IntegrityError
from repofs.maintenance.gc.common import _TOMB
from repofs.maintenance.gc.orphans import _buried
from repofs.maintenance.gc.writers import _alive
from repofs.maintenance.packscan import restore_point_records
from repofs.store.records import RecordType
from repofs.store.repository import Repository
from repofs.store.schema import type_prefix


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
        found += restore_point_records(
            repo.packs, pack_id, repo.config.repository_id, repo.keys
        )
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
        tombs = index.read(lambda t: [k for k, _ in index.items(t, "objects", type_prefix(_TOMB))])
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


def _cleanup_unpublished(repo: Repository) -> int:
    """Unfinished temporary packs of writers that are gone (their pid is in the name)."""
    return repo.packs.cleanup_unpublished(running=_alive)
