"""gc's mark: the live set, every object that a committed restore point reaches.

Step 1 of gc (see :mod:`repofs.maintenance.gc`), and again, inside the
condemning transaction, for restore points committed while gc ran.
"""

from __future__ import annotations

from typing import Any

import lmdb

from repofs.errors import IntegrityError
from repofs.store.mapwalk import MapWalker
from repofs.store.records import ZERO_DIGEST, RecordType
from repofs.store.repository import Repository
from repofs.store.restorepoint import RestorePoint
from repofs.store.rprecords import rp_record_digest
from repofs.store.schema import object_key, type_prefix


class Marker:
    """The live set: object keys reached from restore points, each shared page walked once."""

    def __init__(self, repo: Repository) -> None:
        self.repo = repo
        self.live: set[bytes] = set()
        self.marked: set[tuple[str, str, int]] = set()
        self.walker = MapWalker(repo.config.page_refs, self._load_page)
        self.warnings: list[str] = []
        self._chunk = type_prefix(RecordType.CHUNK)
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
        page = type_prefix(RecordType.PAGE)
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
