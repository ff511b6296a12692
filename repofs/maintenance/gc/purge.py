"""gc's purge: forget what was condemned at a generation no running writer predates, then delete.

Step 4 of gc (see :mod:`repofs.maintenance.gc`); what a writer that started
before may still use waits for a later gc.
"""

from __future__ import annotations

import lmdb

from repofs.maintenance.gc.common import GcResult, _pause, _size
from repofs.maintenance.gc.orphans import _tombstone_orphans
from repofs.maintenance.gc.writers import _oldest_writer
from repofs.store.repository import Repository
from repofs.store.schema import condemned_generation, decode_doomed


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
            if decode_doomed(value)[1] == 0  # never indexed: an indexed pack has a record
            and decode_doomed(value)[2] <= oldest
            and index.get(txn, "packs", pack_id) is None
        ]

    index.check_current()  # belt and braces: under the shared lock no rebuild can run
    # Ingests that died since the first round leave records no tombstone names yet.
    doomed_unindexed = index.read(
        lambda t: [p for p, v in index.items(t, "doomed") if decode_doomed(v)[1] == 0]
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
            if condemned_generation(value) <= oldest:
                index.delete(txn, "condemned", key)
        out, held = [], 0
        for pack_id, value in list(index.items(txn, "doomed")):
            _size_of, count, gen = decode_doomed(value)
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
