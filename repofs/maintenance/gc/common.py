"""What every step of gc shares: its result, the fault-injection pause, small helpers.

Kept apart so that each step (:mod:`.mark`, :mod:`.compact`, :mod:`.sweep`,
:mod:`.purge`, ...) imports it without importing the others.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from repofs.errors import IntegrityError
from repofs.store.packstore import PackStore
from repofs.store.records import RecordType
from repofs.store.schema import key_digest, key_type

#: Fault-injection hook for tests, unset in production: seconds to sleep between gc steps,
#: so that a kill -9 at a random moment can land in every phase.
DELAY_ENV = "REPOFS_TEST_GC_DELAY"
_TOMB = RecordType.TOMBSTONE
#: Record types gc keeps forever: what rebuild-index needs to know beside restore point records.
_KEPT = frozenset({RecordType.TOMBSTONE, RecordType.PROTECTION})


@dataclass
class GcResult:
    """What one gc did; its fields are the keys of ``gc --json`` (docs/maintenance.md)."""

    dry_run: bool = False
    restore_points: int = 0  #: restore points marked
    late_restore_points: int = 0  #: committed while gc marked
    pages: int = 0  #: distinct map pages walked
    live_objects: int = 0  #: chunks, pages, records and blobs reached
    packs_before: int = 0  #: packs the index listed when gc began
    packs_deleted: int = 0  #: condemned packs whose files were deleted (orphans apart)
    packs_rewritten: int = 0  #: packs whose live records were copied into new packs
    packs_spared: int = 0  #: doomed, but an ingest deduplicated against them meanwhile
    packs_held: int = 0  #: condemned, left to a later gc: a writer that started before runs
    orphan_packs: int = 0  #: packs no index entry named (leftovers of killed writers), deleted
    bytes_freed: int = 0  #: bytes of every file deleted (condemned and orphan packs, temporaries)
    bytes_written: int = 0  #: bytes of the new packs that copying wrote
    tmp_freed: int = 0  #: unfinished packs of dead processes, a killed rebuild's half index
    tombstones_written: int = 0  #: for records of restore points never committed
    reservations_removed: int = 0  #: reservations and leases of processes that are gone
    packs_condemned: int = 0  #: (bucket) packs this run condemned; a gc after the wait deletes them
    objects_rescued: int = 0  #: (bucket) live objects copied out of condemned packs before deletion
    leases_removed: int = 0  #: (bucket) expired leases deleted
    logs_removed: int = 0  #: (bucket) log objects deleted, covered by the newest checkpoint
    checkpoints_removed: int = 0  #: (bucket) checkpoints deleted, all but the newest two
    mark_seconds: float = 0.0  #: time spent marking
    seconds: float = 0.0  #: the whole run
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """``gc --json``: every field, and ``freed``, the net bytes the text reports freed."""
        return {"freed": max(self.bytes_freed - self.bytes_written, 0), **asdict(self)}


def _pause(say: str | None = None) -> None:
    delay = os.environ.get(DELAY_ENV)
    if delay:
        if say:
            print(f"repofs: test hook: {say}, pausing", file=sys.stderr, flush=True)
        time.sleep(float(delay))


def _describe(key: bytes) -> str:
    return f"{RecordType(key_type(key)).name.lower()} {key_digest(key).hex()[:16]}"


def _size(store: PackStore, pack_id: bytes) -> int:
    try:
        return store.size(pack_id)
    except IntegrityError:
        return 0
