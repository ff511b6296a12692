"""Bringing back, in an ingest's commit, the objects a concurrent gc condemned.

gc never stops an ingest (``docs/maintenance.md``).  So an ingest that was
running when gc condemned objects may reference some of them: chunks it
deduplicated against before gc looked, its CBT parent's pages when the
parent was pruned meanwhile, the packs it published itself before gc
scanned them.  gc deletes no file of an object condemned at generation G
while an ingest that started before G runs, so in its commit transaction
the ingest walks the new restore point's maps and moves every condemned
object it reaches back into ``objects`` (and its pack back into
``packs``).  The walk is the price of a commit that overlapped a gc; a
commit that did not (the gc generation did not move) skips it.
"""

from __future__ import annotations

import os
from typing import Any

import lmdb

from repofs.errors import IntegrityError
from repofs.store.mapwalk import MapWalker
from repofs.store.records import ZERO_DIGEST, RecordType
from repofs.store.restorepoint import RestorePoint
from repofs.store.rprecords import rp_record_digest
from repofs.store.schema import (
    REVIVALS_KEY,
    Location,
    decode_condemned,
    decode_doomed,
    decode_location,
    decode_u64,
    encode_location,
    encode_pack_info,
    encode_u64,
    key_digest,
    object_key,
    type_prefix,
)


def revive(repo: Any, txn: lmdb.Transaction, rp: RestorePoint) -> int:
    """Move every condemned object ``rp`` references back; returns how many.

    Runs inside the commit's write transaction, so no gc can condemn
    anything between the walk and the commit.  An object that is neither
    indexed nor condemned, or whose pack file is gone, fails the commit
    (nothing becomes visible) rather than commit a damaged restore point.
    """
    index = repo.index
    dbs = index.dbs
    back_packs: set[bytes] = set()
    revived = 0
    missing: list[bytes] = []

    def present(key: bytes) -> Location | None:
        """Where the object lies, bringing it back first if it was condemned."""
        nonlocal revived
        raw = txn.get(key, db=dbs["objects"])
        if raw is not None:
            return decode_location(raw)
        raw = txn.get(key, db=dbs["condemned"])
        if raw is None:
            return None
        loc = decode_condemned(raw)[0]
        if loc.pack_id not in back_packs and txn.get(loc.pack_id, db=dbs["packs"]) is None:
            doomed = txn.get(loc.pack_id, db=dbs["doomed"])
            if doomed is None or not os.path.exists(repo.packs.path_of(loc.pack_id)):
                return None
            size, count, _gen = decode_doomed(doomed)
            txn.put(loc.pack_id, encode_pack_info(size, count), db=dbs["packs"])
            txn.delete(loc.pack_id, db=dbs["doomed"])
        back_packs.add(loc.pack_id)
        txn.put(key, encode_location(*loc), db=dbs["objects"])
        txn.delete(key, db=dbs["condemned"])
        revived += 1
        return loc

    def need(key: bytes) -> Location | None:
        loc = present(key)
        if loc is None:
            missing.append(key)
        return loc

    def load_page(digest: bytes) -> bytes:
        loc = need(object_key(RecordType.PAGE, digest))
        if loc is None:
            raise IntegrityError(f"page {digest.hex()} is neither indexed nor condemned")
        return repo.read_at(RecordType.PAGE, digest, loc)

    chunk = type_prefix(RecordType.CHUNK)
    seen_chunks: set[bytes] = set()

    def on_chunks(page: bytes, _first: int) -> None:
        for k in range(0, len(page), 32):
            ref = page[k : k + 32]
            if ref != ZERO_DIGEST and ref not in seen_chunks:
                seen_chunks.add(ref)
                need(chunk + ref)

    walker = MapWalker(repo.config.page_refs, load_page)
    for disk in rp.disks:
        walker.walk(disk.map, on_chunks)
    for cfg in rp.configs:
        need(object_key(RecordType.BLOB, bytes.fromhex(cfg.digest)))
    need(object_key(RecordType.RESTORE_POINT, rp_record_digest(rp.to_doc(), repo.keys)))
    if walker.faults or missing:
        what = walker.faults[0].message if walker.faults else key_digest(missing[0]).hex()
        raise IntegrityError(
            f"restore point {rp.vm}/{rp.id} not committed: {len(missing)} object(s) it "
            f"references were collected while it was written (first: {what})"
        )
    if revived:  # tells a gc between its plan and its condemning transaction to look again
        txn.put(REVIVALS_KEY, encode_u64(revivals(txn, dbs["meta"]) + 1), db=dbs["meta"])
    return revived


def revivals(txn: lmdb.Transaction, meta: Any) -> int:
    """How many commits have brought condemned objects back, ever."""
    return decode_u64(txn.get(REVIVALS_KEY, db=meta))
