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

Each step is a module: :mod:`.mark` (1), :mod:`.compact` (2), :mod:`.sweep`
(3), :mod:`.purge` (4); beside them :mod:`.orphans` (tombstones for records
never committed), :mod:`.leftovers` (unindexed and unfinished packs),
:mod:`.writers` (running and stale reservations and leases) and
:mod:`.common` (the result, the test pause).  This module runs them.

A kill at any moment leaves either the old pack or the new index entry (or
both): never an index entry without its data.  Mount readers need no lock:
a read that finds its pack gone asks the index again (see
``Repository.read_object``) and gets the moved object or a clean EIO.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Iterator

from repofs.errors import BusyError, IntegrityError, UsageError
from repofs.maintenance.gc.common import GcResult, _describe, _pause, _size
from repofs.maintenance.gc.compact import _copy, _scan
from repofs.maintenance.gc.leftovers import (
    _refuse_if_index_is_behind,
    unindexed_packs,
    unlisted_restore_points,
)
from repofs.maintenance.gc.mark import Marker
from repofs.maintenance.gc.s3 import collect_bucket
from repofs.maintenance.gc.sweep import _sweep
from repofs.store.lock import open_lock_file
from repofs.store.opening import open_repository
from repofs.store.reserve import gave_up_warning, retry_with_reserve, set_aside
from repofs.store.s3repo import S3Repository

GC_LOCK = "lock.gc"
DEFAULT_THRESHOLD = 0.5
SMALL_PACK = 1024 * 1024
SMALL_PACKS_TO_MERGE = 8


def collect_garbage(
    path: str, *, threshold: float = DEFAULT_THRESHOLD, dry_run: bool = False
) -> GcResult:
    """Mark, copy, condemn and delete, all under the shared lock: ingests never wait for gc."""
    if not 0 <= threshold <= 1:
        raise UsageError(f"--threshold {threshold * 100:g} must be a percentage from 0 to 100")
    t0 = time.monotonic()
    result = GcResult(dry_run=dry_run)
    with open_repository(path) as repo, _gc_lock(repo.path):
        if isinstance(repo, S3Repository):  # no lock the hosts share: condemn, wait, delete
            return collect_bucket(repo, threshold=threshold, dry_run=dry_run, t0=t0)
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
            _, held = retry_with_reserve(repo.path, lambda: _sweep(repo, marker, doomed, result))
            if held:
                result.warnings.append(gave_up_warning(held, "sweep"))
        if not dry_run and (size := set_aside(repo.path)):
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
