"""``repofs prune`` and ``delete``, and the protected flag that both respect.

prune is grandfather-father-son retention, per VM; delete removes restore
points named by id (the way out of a damaged state that gc refuses to
collect).  Both write tombstones before the removal.

The policy works like restic's ``forget``: each rule looks at all restore
points of a VM, newest first, puts them in periods (UTC hours, days, ISO
weeks, months, years; ``last`` puts each in its own) and keeps the newest
restore point of each of its N most recent periods.  The rules are
independent: a restore point kept by several rules is listed with every
reason, and counts for each.  A policy whose counts are all zero keeps
nothing and needs ``--force``.  A protected restore point (``repofs
protect``) is always kept, with the reason ``protected``; the rules still
count it, as restic's ``--keep-tag`` does.  ``delete`` refuses it.

Removal never breaks other restore points: every restore point is a full
map that shares pages by digest, so a CBT or incremental child needs
nothing from its parent's record.  Space comes back only with ``gc``.

Durability order: every tombstone (a record naming VM, id and sequence
number) is written into a pack and published first; then one LMDB
transaction removes the restore points.  ``rebuild-index`` honours
tombstones, so a crash at any moment either leaves the restore point in
place or gone for good, never resurrected.

The protected flag is the one thing about a restore point that changes, so
it is not in its record: protect and unprotect write a PROTECTION record
(durable first), then set the flag in the index's copy in one transaction;
``rebuild-index`` takes the newest record of each restore point.  prune,
delete, protect and unprotect hold :func:`repofs.store.lock.keep_lock` from their
decision to their transaction, so none acts on a stale flag.
"""

from __future__ import annotations

import datetime
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from repofs.errors import UsageError
from repofs.store.lock import keep_lock
from repofs.store.names import validate_vm_name
from repofs.store.opening import open_repository
from repofs.store.records import RecordType
from repofs.store.repository import Repository
from repofs.store.reserve import retry_with_reserve
from repofs.store.restorepoint import RestorePoint
from repofs.store.rprecords import Protection


def _iso_week(t: time.struct_time) -> str:
    year, week, _ = datetime.date(t.tm_year, t.tm_mon, t.tm_mday).isocalendar()
    return f"{year}-W{week:02d}"


#: rule name -> the period a restore point's UTC creation time falls in (None: each its own)
RULES: dict[str, Callable[[time.struct_time], str] | None] = {
    "last": None,
    "hourly": lambda t: time.strftime("%Y-%m-%d %H", t),
    "daily": lambda t: time.strftime("%Y-%m-%d", t),
    "weekly": _iso_week,
    "monthly": lambda t: time.strftime("%Y-%m", t),
    "yearly": lambda t: time.strftime("%Y", t),
}


@dataclass(frozen=True)
class Policy:
    """How many periods each rule keeps; zero switches a rule off."""

    last: int = 0
    hourly: int = 0
    daily: int = 0
    weekly: int = 0
    monthly: int = 0
    yearly: int = 0

    def __post_init__(self) -> None:
        for rule in RULES:
            if getattr(self, rule) < 0:
                raise UsageError(f"--keep-{rule} must be zero or more")

    def keeps_nothing(self) -> bool:
        return not any(getattr(self, rule) for rule in RULES)

    def describe(self) -> str:
        parts = [f"{rule} {getattr(self, rule)}" for rule in RULES if getattr(self, rule)]
        return ", ".join(parts) if parts else "nothing"


@dataclass
class Decision:
    rp: RestorePoint
    reasons: list[str] = field(default_factory=list)

    @property
    def keep(self) -> bool:
        return bool(self.reasons)


def plan(rps: list[RestorePoint], policy: Policy) -> list[Decision]:
    """Decide for the restore points of one VM; returned newest first."""
    ordered = sorted(rps, key=lambda rp: (rp.created, rp.id), reverse=True)
    decisions = [Decision(rp) for rp in ordered]
    for rule, period_of in RULES.items():
        want = getattr(policy, rule)
        kept = 0
        last_period: str | None = None
        for d in decisions:
            if kept >= want:
                break
            period = d.rp.id if period_of is None else period_of(time.gmtime(d.rp.created))
            if period != last_period:
                last_period = period
                kept += 1
                d.reasons.append(f"{rule} #{kept}")
    for d in decisions:
        if d.rp.protected:
            d.reasons.append("protected")
    return decisions


@dataclass
class PruneResult:
    decisions: dict[str, list[Decision]]
    dry_run: bool
    removed: int = 0
    reserve_given_up: int = 0  #: bytes of the repository's reserve used because the disk was full

    @property
    def to_remove(self) -> list[Decision]:
        return [d for ds in self.decisions.values() for d in ds if not d.keep]

    def to_dict(self) -> dict[str, Any]:
        """``prune --json``: what was kept and why, what the policy removes, what left the index.

        ``removed`` lists the restore points the policy removes (would, in a
        dry run); ``removed_count`` counts those this run took out of the
        index (0 in a dry run; fewer if a concurrent prune took some first).
        """
        ordered = [d for _vm, ds in sorted(self.decisions.items()) for d in ds]
        return {
            "dry_run": self.dry_run,
            "kept": [
                {"vm": d.rp.vm, "id": d.rp.id, "reasons": d.reasons} for d in ordered if d.keep
            ],
            "removed": [{"vm": d.rp.vm, "id": d.rp.id} for d in ordered if not d.keep],
            "removed_count": self.removed,
            "reserve_given_up": self.reserve_given_up,
        }


def prune_repository(
    path: str, policy: Policy, *, vm: str | None = None, dry_run: bool = False, force: bool = False
) -> PruneResult:
    """Apply ``policy`` to one VM or all; write tombstones, then drop the restore points."""
    if vm is not None:
        validate_vm_name(vm)
    if policy.keeps_nothing() and not force:
        raise UsageError(
            "this policy keeps nothing: give at least one --keep-* option above zero, "
            "or --force to remove every restore point"
        )
    with (
        open_repository(path) as repo,
        repo.lock(),  # decides on the index in force, not one replaced while it waited
        keep_lock(repo.path),
    ):
        rps = repo.restore_points(vm)
        if vm is not None and not rps:
            raise UsageError(f"unknown VM {vm!r}: it has no restore points")
        by_vm: dict[str, list[RestorePoint]] = {}
        for rp in rps:
            by_vm.setdefault(rp.vm, []).append(rp)
        result = PruneResult({name: plan(group, policy) for name, group in by_vm.items()}, dry_run)
        doomed = [d.rp for d in result.to_remove]
        if not dry_run and doomed:
            # Tombstones written twice are harmless; the second transaction finishes the job.
            result.removed, result.reserve_given_up = retry_with_reserve(
                path, lambda: _remove(repo, doomed)
            )
    return result


def _remove(repo: Repository, doomed: list[RestorePoint]) -> int:
    def present(txn: Any) -> list[RestorePoint]:
        out = []
        for rp in doomed:
            doc = repo.index.get_rp(txn, rp.vm, rp.id)
            if doc is not None and doc.get("seq") == rp.seq:  # a concurrent prune may have won
                out.append(rp)
        return out

    # Counted before the tombstones: in a bucket they are facts that take the
    # restore points out of this host's index as they are written.
    removed = len(repo.index.read(present))
    repo.write_tombstones(doomed)  # durable and indexed before anything leaves the index

    def txn_fn(txn: Any) -> None:
        for rp in present(txn):
            repo.index.delete_rp(txn, rp.vm, rp.id, rp.seq)

    repo.index.write(txn_fn)
    return removed


@dataclass
class DeleteResult:
    vm: str
    doomed: list[RestorePoint]
    dry_run: bool
    removed: int = 0
    reserve_given_up: int = 0


def delete_restore_points(
    path: str, vm: str, ids: list[str], *, dry_run: bool = False
) -> DeleteResult:
    """Remove the named restore points of ``vm``, all or none: tombstones, then one transaction.

    Ids only: ``latest`` would name another restore point after every
    ingest, which a command that cannot be undone must not guess.  A
    protected restore point is refused; ``repofs unprotect`` comes first.
    """
    validate_vm_name(vm)
    if not ids:
        raise UsageError("name at least one restore point id to delete")
    if "latest" in ids:
        raise UsageError(
            "delete takes restore point ids, not 'latest' (an alias that moves with every "
            f"ingest): 'repofs list REPO {vm}' shows the ids"
        )
    with (
        open_repository(path) as repo,
        repo.lock(),  # decides on the index in force, not one replaced while it waited
        keep_lock(repo.path),
    ):
        doomed = []
        for rp_id in dict.fromkeys(ids):
            rp = repo.resolve(vm, rp_id)
            if rp.protected:
                raise UsageError(
                    f"restore point {vm}/{rp_id} is protected; run "
                    f"'repofs unprotect {path} {vm} {rp_id}' first (nothing was deleted)"
                )
            doomed.append(rp)
        result = DeleteResult(vm, doomed, dry_run)
        if not dry_run:
            result.removed, result.reserve_given_up = retry_with_reserve(
                path, lambda: _remove(repo, doomed)
            )
    return result


@dataclass
class FlagChange:
    rp: RestorePoint
    changed: bool  #: False: it already had the flag asked for


def set_protected(
    path: str, vm: str, specs: list[str], protected: bool
) -> tuple[list[FlagChange], int]:
    """Protect or unprotect restore points of ``vm`` (ids, or ``latest``).

    Each restore point gets a PROTECTION record, durable and indexed before
    one transaction sets the flag in the index: a crash leaves the old flag
    or the new one, and rebuild-index finds the new one in the packs.  The
    record is written also when the index already has the flag, as the
    packs may hold a newer record of a killed command that says otherwise.
    Returns the changes and the bytes of the reserve given up: on a full
    disk unprotect is the step before a delete that frees space.
    """
    validate_vm_name(vm)
    if not specs:
        raise UsageError("name at least one restore point id (or 'latest')")
    with (
        open_repository(path) as repo,
        repo.lock(),  # decides on the index in force, not one replaced while it waited
        keep_lock(repo.path),
    ):
        rps = list({rp.id: rp for rp in (repo.resolve(vm, spec) for spec in specs)}.values())
        if protected:
            _refuse_tombstoned(repo, rps)
        changes = [FlagChange(rp, rp.protected != protected) for rp in rps]
        # Written even where the index already has the flag: a protect or unprotect
        # killed between its record and its transaction leaves a newer record that
        # says the opposite, which rebuild-index would follow.  This record is newer.
        _, held = retry_with_reserve(repo.path, lambda: _flag(repo, rps, protected))
    return changes, held


def _refuse_tombstoned(repo: Repository, rps: list[RestorePoint]) -> None:
    """Refuse to protect a restore point that a tombstone already names.

    A prune or delete killed between its tombstones and its index
    transaction leaves the restore point listed, but the next rebuild-index
    drops it: a protection then would promise what it cannot keep.
    """
    from repofs.maintenance.gc.orphans import buried_restore_points

    buried = buried_restore_points(repo)
    for rp in rps:
        if (rp.vm, rp.id, rp.seq) in buried:
            raise UsageError(
                f"restore point {rp.vm}/{rp.id} was being removed (a prune or delete was "
                "interrupted after writing its tombstone) and cannot be protected; run "
                f"'repofs delete {repo.path} {rp.vm} {rp.id}' to finish the removal"
            )


def _flag(repo: Repository, rps: list[RestorePoint], protected: bool) -> None:
    first = repo.flag_seqs(len(rps))
    flags = [
        Protection(rp.vm, rp.id, rp.seq, n, protected) for rp, n in zip(rps, first, strict=True)
    ]
    # durable and indexed before the index says anything
    repo.publish_records("protection", RecordType.PROTECTION, [f.body() for f in flags])

    def txn_fn(txn: Any) -> None:
        for flag in flags:
            doc = repo.index.get_rp(txn, flag.vm, flag.id)
            if doc is None or doc.get("seq") != flag.seq:
                continue  # removed meanwhile (it cannot be, under keep_lock); nothing to set
            if doc.get("protected_seq", 0) > flag.flag_seq:
                continue
            doc["protected"], doc["protected_seq"] = flag.protected, flag.flag_seq
            repo.index.put_rp(txn, flag.vm, flag.id, flag.seq, doc)

    repo.index.write(txn_fn)
