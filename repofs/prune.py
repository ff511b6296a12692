"""``repofs prune``: grandfather-father-son retention, per VM, and tombstones before removal.

The policy works like restic's ``forget``: each rule looks at all restore
points of a VM, newest first, puts them in periods (UTC hours, days, ISO
weeks, months, years; ``last`` puts each in its own) and keeps the newest
restore point of each of its N most recent periods.  The rules are
independent: a restore point kept by several rules is listed with every
reason, and counts for each.  A policy whose counts are all zero keeps
nothing and needs ``--force``.

Removal never breaks other restore points: every restore point is a full
map that shares pages by digest, so a CBT or incremental child needs
nothing from its parent's record.  Space comes back only with ``gc``.

Durability order: every tombstone (a record naming VM, id and sequence
number) is written into a pack and published first; then one LMDB
transaction removes the restore points.  ``rebuild-index`` honours
tombstones, so a crash at any moment either leaves the restore point in
place or gone for good, never resurrected.
"""

from __future__ import annotations

import datetime
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from repofs.errors import UsageError
from repofs.names import validate_vm_name
from repofs.repository import Repository
from repofs.reserve import retry_with_reserve
from repofs.restorepoint import RestorePoint


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
    with Repository.open(path) as repo, repo.lock():  # decides on the index it holds locked
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
    repo.write_tombstones(doomed)  # durable and indexed before anything leaves the index

    def txn_fn(txn: Any) -> int:
        removed = 0
        for rp in doomed:
            doc = repo.index.get_rp(txn, rp.vm, rp.id)
            if doc is not None and doc.get("seq") == rp.seq:  # a concurrent prune may have won
                repo.index.delete_rp(txn, rp.vm, rp.id, rp.seq)
                removed += 1
        return removed

    return repo.index.write(txn_fn)
