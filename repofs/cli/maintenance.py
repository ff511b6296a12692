"""The maintenance commands: ``verify``, ``prune``, ``delete``, ``protect``, ``unprotect``,
``gc``, ``rebuild-index`` and ``info``.

They live apart from :mod:`repofs.cli.main` so that they can evolve without
touching the commands everyone else edits; :func:`register` adds them to
the main group.  Errors follow the same rule as every other command: a
:class:`~repofs.errors.RepofsError` becomes one ``repofs: error:`` line.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

from repofs.cli.common import (
    emit_json,
    json_option,
    lock_wait_option,
    progress_option,
    repo_argument,
    repo_vm_and_rest,
)
from repofs.errors import IntegrityError
from repofs.util.progress import human_bytes


def register(main: click.Group) -> None:
    """Add the maintenance commands to the ``repofs`` command group."""
    for command in (verify, prune, delete, protect, unprotect, gc, rebuild_index, info):
        main.add_command(command)


@click.command()
@repo_argument
@click.option("--vm", default=None, metavar="NAME", help="Check only this VM's restore points.")
@click.option(
    "--sample",
    type=float,
    default=None,
    metavar="PERCENT",
    help="Re-hash only this percentage of the chunks (maps are always checked whole).",
)
@click.option(
    "--all-ranges", is_flag=True, help="Name every damaged byte range, not only the first few."
)
@click.option(
    "--sizes-only",
    is_flag=True,
    help="Read no pack: check that every pack the index names exists with its size "
    "(one LIST per 1000 packs on a bucket) and that the bucket's log decodes. "
    "A flipped byte inside a pack goes unnoticed.",
)
@progress_option
@json_option
@lock_wait_option()
def verify(
    repo: str,
    vm: str | None,
    sample: float | None,
    all_ranges: bool,
    sizes_only: bool,
    progress: bool | None,
    as_json: bool,
) -> None:
    """Re-read and re-hash stored data; name every damaged VM, restore point, disk and byte range.

    Exits non-zero when anything is missing or damaged.  With --sizes-only,
    only that every pack is there with the size the index expects.
    """
    from repofs.maintenance.verify.checks import MAX_RANGES_SHOWN, verify_repository

    r = verify_repository(
        repo,
        vm=vm,
        sample=sample,
        max_ranges=None if all_ranges else MAX_RANGES_SHOWN,
        progress=progress,
        sizes_only=sizes_only,
    )
    if as_json:
        emit_json(r.to_dict())
        if r.problems:  # the exit status still says it
            raise IntegrityError(f"verify found {len(r.problems)} problem(s)")
        return
    for p in r.problems:
        click.echo(f"PROBLEM {p.subject}: {p.message}")
        for a in p.affects:
            click.echo(f"    affects {a}")
    for w in r.warnings:
        click.echo(f"warning: {w}")
    log = f", {r.log_objects} log object(s) decoded" if r.log_objects else ""
    if r.mode == "sizes":
        click.echo(
            f"checked that {r.packs} pack(s) of {r.restore_points} restore point(s) of "
            f"{r.vms} VM(s) exist with their sizes{log}, in {r.elapsed:.1f} s "
            "(no pack read: a damaged byte inside a pack needs the full verify)"
        )
        if r.problems:
            raise IntegrityError(
                f"verify found {len(r.problems)} problem(s); see the lines above"
            )
        click.echo("no problems found")
        return
    rate = r.bytes_checked / r.elapsed / 1e6 if r.elapsed > 0 else 0.0
    what = f"{r.sample:g}% sample of the chunks, " if r.sample is not None else ""
    click.echo(
        f"checked {r.restore_points} restore point(s) of {r.vms} VM(s), "
        f"{r.pages} map pages, {what}{r.objects_checked} objects "
        f"({human_bytes(r.bytes_checked)}){log} in {r.elapsed:.1f} s ({rate:.0f} MB/s)"
    )
    if r.problems:
        raise IntegrityError(f"verify found {len(r.problems)} problem(s); see the lines above")
    click.echo("no problems found")


#: prune's retention options, in the order ``--help`` lists them.
_KEEP_OPTIONS = (
    ("last", "Keep the N newest restore points."),
    ("hourly", "Keep the newest restore point of each of the last N hours that have one."),
    ("daily", "... of each of the last N days (UTC)."),
    ("weekly", "... of each of the last N ISO weeks."),
    ("monthly", "... of each of the last N months."),
    ("yearly", "... of each of the last N years."),
)


def keep_options(f: Callable[..., None]) -> Callable[..., None]:
    """Add ``--keep-last`` ... ``--keep-yearly``: six options that differ only in unit and help."""
    for unit, text in reversed(_KEEP_OPTIONS):  # click lists the last decorator applied first
        f = click.option(
            f"--keep-{unit}", type=click.IntRange(min=0), default=0, metavar="N", help=text
        )(f)
    return f


@click.command()
@repo_argument
@click.option("--vm", default=None, metavar="NAME", help="Prune only this VM (default: every VM).")
@keep_options
@click.option("--dry-run", "-n", is_flag=True, help="Only show what would be kept and removed.")
@click.option("--force", is_flag=True, help="Allow a policy that keeps nothing.")
@json_option
@lock_wait_option()
def prune(
    repo: str,
    vm: str | None,
    keep_last: int,
    keep_hourly: int,
    keep_daily: int,
    keep_weekly: int,
    keep_monthly: int,
    keep_yearly: int,
    dry_run: bool,
    force: bool,
    as_json: bool,
) -> None:
    """Remove restore points that a retention policy does not keep (run gc to free the space)."""
    from repofs.maintenance.prune import Policy, prune_repository

    policy = Policy(keep_last, keep_hourly, keep_daily, keep_weekly, keep_monthly, keep_yearly)
    r = prune_repository(repo, policy, vm=vm, dry_run=dry_run, force=force)
    if as_json:
        emit_json(r.to_dict())
        return
    verb = "would remove" if dry_run else "remove"
    for name, decisions in sorted(r.decisions.items()):
        for d in decisions:  # a protected one says "keep (..., protected)"
            action = "keep" if d.keep else verb
            why = f"  ({', '.join(d.reasons)})" if d.keep else ""
            click.echo(f"{name:<16} {d.rp.id:<19} {action}{why}")
    count = len(r.to_remove)
    if dry_run:
        click.echo(
            f"dry run: would remove {count} restore point(s); policy keeps {policy.describe()}"
        )
    elif count:
        _reserve_warning(r.reserve_given_up, "prune")
        click.echo(
            f"removed {r.removed} restore point(s); run 'repofs gc {repo}' to free their space"
        )
    else:
        click.echo("nothing to remove")


@click.command()
@click.argument("args", nargs=-1, required=True, metavar="[REPO] VM RP...")
@click.option("--dry-run", "-n", is_flag=True, help="Only show what would be deleted.")
@json_option
@lock_wait_option()
def delete(args: tuple[str, ...], dry_run: bool, as_json: bool) -> None:
    """Remove restore points of VM by id (not 'latest'); run gc to free the space.

    The way out when gc refuses to run past damaged restore points.  All or
    none: an unknown or protected id deletes nothing.
    """
    from repofs.maintenance.prune import delete_restore_points

    repo, vm, ids = repo_vm_and_rest(args, "RP")
    r = delete_restore_points(repo, vm, list(ids), dry_run=dry_run)
    if as_json:
        emit_json(
            {
                "vm": vm,
                "dry_run": dry_run,
                "restore_points": [rp.id for rp in r.doomed],
                "removed": r.removed,
                "reserve_given_up": r.reserve_given_up,
            }
        )
        return
    verb = "would delete" if dry_run else "delete"
    for rp in r.doomed:
        click.echo(f"{vm:<16} {rp.id:<19} {verb}")
    if dry_run:
        click.echo(f"dry run: would delete {len(r.doomed)} restore point(s)")
        return
    _reserve_warning(r.reserve_given_up, "delete")
    click.echo(f"deleted {r.removed} restore point(s); run 'repofs gc {repo}' to free their space")


def _flag_command(args: tuple[str, ...], protected: bool, as_json: bool) -> None:
    from repofs.maintenance.prune import set_protected

    repo, vm, specs = repo_vm_and_rest(args, "RP")

    changes, held = set_protected(repo, vm, list(specs), protected)
    if as_json:  # ``latest`` resolved: a script learns which id it protected
        emit_json(
            {
                "vm": vm,
                "protected": protected,
                "restore_points": [{"id": c.rp.id, "changed": c.changed} for c in changes],
                "reserve_given_up": held,
            }
        )
        return
    word = "protected" if protected else "unprotected"
    _reserve_warning(held, "protect" if protected else "unprotect")
    for c in changes:
        click.echo(f"{c.rp.vm}/{c.rp.id}: {word}" + ("" if c.changed else " (it already was)"))


def _flag_cli(name: str, protected: bool, doc: str) -> click.Command:
    """``protect`` or ``unprotect``: the same command but for the flag it sets."""

    @click.command(name, help=doc)
    @click.argument("args", nargs=-1, required=True, metavar="[REPO] VM RP|latest...")
    @lock_wait_option()
    @json_option
    def command(args: tuple[str, ...], as_json: bool) -> None:
        _flag_command(args, protected, as_json)

    return command


protect = _flag_cli(
    "protect", True, "Protect restore points: prune keeps them and delete refuses them."
)
unprotect = _flag_cli("unprotect", False, "Take the protection of restore points away again.")


@click.command()
@repo_argument
@click.option(
    "--threshold",
    type=click.FloatRange(0, 100),
    default=50.0,
    show_default=True,
    metavar="PERCENT",
    help="Rewrite packs whose live data is below this percentage.",
)
@click.option("--dry-run", "-n", is_flag=True, help="Mark and plan only; delete nothing.")
@json_option
@lock_wait_option()
def gc(repo: str, threshold: float, dry_run: bool, as_json: bool) -> None:
    """Free the space of data no restore point references; may run beside ingests and mounts."""
    from repofs.maintenance.gc import collect_garbage

    r = collect_garbage(repo, threshold=threshold / 100, dry_run=dry_run)
    if as_json:
        emit_json(r.to_dict())
        return
    for w in r.warnings:
        click.echo(f"warning: {w}")
    click.echo(
        f"marked {r.restore_points + r.late_restore_points} restore point(s) "
        f"({r.late_restore_points} committed during gc), {r.pages} map pages, "
        f"{r.live_objects} live objects in {r.mark_seconds:.1f} s"
    )
    if dry_run:
        click.echo(
            f"dry run: would delete {r.packs_deleted} pack(s) and rewrite "
            f"{r.packs_rewritten}, remove {r.orphan_packs} unindexed pack(s), "
            f"freeing about {human_bytes(r.bytes_freed)}"
            + (f"; condemn {r.packs_condemned} pack(s)" if r.packs_condemned else "")
        )
        return
    click.echo(
        f"deleted {r.packs_deleted} pack(s), rewrote {r.packs_rewritten}, removed "
        f"{r.orphan_packs} unindexed pack(s), {r.reservations_removed} stale "
        f"reservation(s); spared {r.packs_spared} pack(s) a running ingest used"
    )
    if r.packs_condemned or r.objects_rescued or r.leases_removed or r.logs_removed:
        click.echo(  # a repository in a bucket: deletion waits for the leases (docs/maintenance.md)
            f"condemned {r.packs_condemned} pack(s), copied {r.objects_rescued} live object(s) "
            f"out of condemned packs; removed {r.leases_removed} expired lease(s), "
            f"{r.logs_removed} log object(s), {r.checkpoints_removed} checkpoint(s)"
        )
    if r.packs_held:
        click.echo(
            f"kept {r.packs_held} condemned pack(s) that ingests still running may use; "
            "the next gc deletes them"
        )
    net = r.bytes_freed - r.bytes_written
    click.echo(
        f"freed {human_bytes(max(net, 0))} ({human_bytes(r.bytes_freed)} deleted, "
        f"{human_bytes(r.bytes_written)} rewritten) in {r.seconds:.1f} s"
    )
    for note in r.notes:
        click.echo(note)


def _reserve_warning(held: int, action: str) -> None:
    """prune and rebuild-index leave setting the reserve aside again to gc."""
    if held:
        from repofs.store.reserve import gave_up_warning

        click.echo(f"warning: {gave_up_warning(held, action)}; gc sets it aside again")


@click.command(name="rebuild-index")
@repo_argument
@click.option(
    "--scan-packs",
    is_flag=True,
    help="s3:// only: also download and read every pack record by record, dropping damaged "
    "objects from this host's cache (a local rebuild always reads every pack).",
)
@progress_option
@json_option
@lock_wait_option()
def rebuild_index(repo: str, scan_packs: bool, progress: bool | None, as_json: bool) -> None:
    """Rebuild the index from the pack files alone, and swap it in atomically.

    On s3://: rebuild this host's cache of the index from the bucket's newest
    checkpoint and log (add --scan-packs to read every pack too).
    """
    from repofs.store.location import is_s3

    if is_s3(repo):
        _rebuild_bucket(repo, scan_packs, progress, as_json)
        return
    from repofs.maintenance.rebuild import rebuild_index as do_rebuild

    r = do_rebuild(repo, progress=progress)
    if as_json:
        emit_json(r.to_dict())
        if r.incomplete:  # the exit status still says it; the new index is in place
            raise IntegrityError(
                f"the index is rebuilt, but {len(r.incomplete)} restore point(s) are incomplete"
            )
        return
    _reserve_warning(r.reserve_given_up, "rebuild")
    for line in r.skipped_packs:
        click.echo(f"skipped: {line}")
    for line in r.damaged:
        click.echo(f"damaged: {line}")
    for name in r.rewritten:
        click.echo(
            f"rewritten: {name}: no pack held its record any more; written again from the old index"
        )
    for line in r.incomplete:
        click.echo(f"incomplete: {line}")
    click.echo(
        f"rebuilt the index from {r.packs} pack(s) ({human_bytes(r.bytes_scanned)}, "
        f"{r.records} records): {r.restore_points} restore point(s) of {r.vms} VM(s), "
        f"{r.tombstoned} pruned one(s) left out, in {r.seconds:.1f} s"
    )
    if r.incomplete:  # a script must see it; the new index is in place all the same
        raise IntegrityError(
            f"the index is rebuilt, but {len(r.incomplete)} restore point(s) are incomplete "
            "(see the lines above); 'repofs verify' shows the byte ranges"
        )
    if r.damaged:
        click.echo("damaged records were left out; every restore point is complete")


def _rebuild_bucket(url: str, scan_packs: bool, progress: bool | None, as_json: bool) -> None:
    from repofs.maintenance.s3rebuild import rebuild_bucket_index

    r = rebuild_bucket_index(url, scan_packs=scan_packs, progress=progress)
    if as_json:
        emit_json(r.to_dict())
        if r.incomplete:
            raise IntegrityError(
                f"the cache is rebuilt, but {len(r.incomplete)} restore point(s) are incomplete"
            )
        return
    for line in r.skipped_packs:
        click.echo(f"skipped: {line}")
    for line in r.damaged:
        click.echo(f"damaged: {line}")
    for line in r.incomplete:
        click.echo(f"incomplete: {line}")
    source = f"checkpoint {r.checkpoint} and " if r.checkpoint else ""
    scanned = (
        f"; read {r.packs} pack(s) ({human_bytes(r.bytes_scanned)}), "
        f"{r.dropped_objects} object(s) dropped"
        if r.mode == "scan"
        else ""
    )
    click.echo(
        f"rebuilt the cache {r.cache_dir} of {r.url} from {source}{r.log_objects} log "
        f"object(s): {r.restore_points} restore point(s) of {r.vms} VM(s){scanned}, "
        f"in {r.seconds:.1f} s"
    )
    if r.incomplete:
        raise IntegrityError(
            f"the cache is rebuilt, but {len(r.incomplete)} restore point(s) are incomplete "
            "(see the lines above); 'repofs verify' shows the byte ranges"
        )


@click.command()
@repo_argument
@json_option
def info(repo: str, as_json: bool) -> None:
    """Show the repository's format, chunking, encryption, sizes and the locks held now.

    Takes no lock and walks no object, so it answers at once, even beside gc.
    """
    from repofs.maintenance.info import repository_info

    doc = repository_info(repo)
    if as_json:
        emit_json(doc)
        return
    if "url" in doc:
        _bucket_info_rows(doc)
        return
    rows = [
        ("repository", doc["path"]),
        ("id", doc["repository_id"]),
        *_config_rows(doc),
        ("packs", f"{doc['pack_count']} ({human_bytes(doc['pack_bytes'])})"),
        ("index", human_bytes(doc["index_bytes"])),
        ("reserve", human_bytes(doc["reserve_bytes"])),
        ("on disk", human_bytes(doc["total_bytes"])),
    ]
    locks = doc["locks"]
    if locks is None:
        rows.append(("locks held", "unknown (/proc/locks cannot be read)"))
    elif not locks:
        rows.append(("locks held", "none"))
    for h in locks or []:
        state = "waiting for" if h["waiting"] else "held"
        who = f"pid {h['pid']}" + (f" ({h['command']})" if h["command"] else "")
        rows.append(("lock", f"{h['file']} {h['mode']}, {state} by {who}"))
    for k, v in rows:
        click.echo(f"{k:<20} {v}")


def _config_rows(doc: dict[str, Any]) -> list[tuple[str, str]]:
    """The rows ``info`` shows alike for a directory and a bucket: config and counts."""
    return [
        ("format", f"{doc['format']} version {doc['version']}"),
        ("chunk size", human_bytes(doc["chunk_size"])),
        ("compression", doc["compression"]),
        ("encryption", doc["encryption"]),
        ("map page", f"{doc['page_refs']} references"),
        ("pack target size", human_bytes(doc["pack_target_size"])),
        ("VMs", str(doc["vms"])),
        ("restore points", str(doc["restore_points"])),
    ]


def _bucket_info_rows(doc: dict[str, Any]) -> None:
    """``repofs info s3://...`` as text: the same fields as ``--json``."""
    live = [x for x in doc["leases"] if x["alive"]]
    rows = [
        ("repository", doc["url"]),
        ("endpoint", doc["endpoint"] or "the AWS default"),
        ("id", doc["repository_id"]),
        *_config_rows(doc),
        ("pack objects", f"{doc['pack_count']} ({human_bytes(doc['pack_bytes'])})"),
        (
            "log objects",
            f"{doc['log_objects']} ({doc['commit_objects']} commits, "
            f"{human_bytes(doc['log_bytes'])})",
        ),
        ("checkpoints", f"{doc['checkpoints']} ({human_bytes(doc['checkpoint_bytes'])})"),
        ("leases", f"{len(doc['leases'])} ({len(live)} alive)"),
        ("cache", f"{doc['cache_dir']} ({human_bytes(doc['cache_bytes'])})"),
        ("cache index", human_bytes(doc["index_bytes"])),
    ]
    for x in doc["leases"]:
        state = "alive" if x["alive"] else "expired"
        rows.append(("lease", f"{x['what']} by pid {x['pid']} on {x['host']} ({state})"))
    for k, v in rows:
        click.echo(f"{k:<20} {v}")
