"""An ingest as the CLI asks for it: parse, validate everything, then lock and run.

All validation (names, sources, changed-block lists, parent) happens before
the repository is locked or written, so bad input never leaves a trace.
"""

from __future__ import annotations

import contextlib

from ingest.cbt import load_changed_blocks
from ingest.detect import open_source
from ingest.pipeline import DiskRequest, Ingest
from repofs.errors import UsageError
from repofs.names import validate_restore_point_names, validate_vm_name
from repofs.repository import Repository
from repofs.restorepoint import RestorePoint


def split_assignment(spec: str, what: str) -> tuple[str, str]:
    """``NAME=VALUE`` -> (NAME, VALUE), with a clear error for anything else."""
    name, sep, value = spec.partition("=")
    if not sep or not name or not value:
        raise UsageError(f"{what} {spec!r} must have the form NAME=VALUE")
    return name, value


def run_ingest(
    repo_path: str,
    vm: str,
    disk_specs: list[str],
    configs: list[str],
    *,
    fmt: str | None = None,
    parent_spec: str | None = None,
    changed_specs: list[str] | None = None,
    cbt_check: int = 0,
    progress: bool | None = None,
) -> RestorePoint:
    validate_vm_name(vm, new=True)
    pairs = [split_assignment(s, "disk") for s in disk_specs]
    if not pairs:
        raise UsageError("no disks given: name at least one DISK=SOURCE")
    validate_restore_point_names([name for name, _ in pairs], configs)
    seen = {name for name, _ in pairs}
    changed_by_disk: dict[str, str] = {}
    for spec in changed_specs or []:
        name, value = split_assignment(spec, "--changed-blocks")
        if name not in seen:
            raise UsageError(f"--changed-blocks names disk {name!r}, which is not in this ingest")
        if name in changed_by_disk:
            raise UsageError(f"--changed-blocks given twice for disk {name!r}")
        changed_by_disk[name] = value
    if cbt_check < 0:
        raise UsageError("--cbt-check must be zero or more")
    if cbt_check and not changed_by_disk:  # silently checking nothing would read as a pass
        raise UsageError("--cbt-check checks changed-block lists: give --changed-blocks too")
    if parent_spec is not None and not parent_spec.strip():
        # Never read as "no --parent": that would quietly mean the latest.
        raise UsageError("--parent is empty: give a restore point id or 'latest'")

    repo = Repository.open(repo_path)
    with contextlib.ExitStack() as stack:
        stack.callback(repo.close)
        parent = repo.resolve(vm, parent_spec) if parent_spec is not None else repo.latest(vm)
        requests = []
        for name, path in pairs:
            source = open_source(path, fmt)
            stack.callback(source.close)
            changed = None
            if name in changed_by_disk:
                if parent is None:
                    raise UsageError(
                        f"--changed-blocks needs a parent restore point and VM {vm!r} has none"
                    )
                listed = load_changed_blocks(changed_by_disk[name], source.size, path)
                changed = list(listed.extents)
            requests.append(DiskRequest(name, source, changed))
        job = Ingest(repo, vm, requests, configs, parent=parent, progress=progress)
        job.check_cbt(cbt_check)
        with repo.lock():  # follows an index that rebuild-index replaced while we waited
            if parent_spec is None:
                # The latest may have changed while we waited for the lock.
                latest = repo.latest(vm)
                if (latest and parent and latest.id != parent.id) and not changed_by_disk:
                    job.parent = latest
            if job.parent is not None and repo.get_rp(vm, job.parent.id) is None:
                # Pruned (and perhaps collected) before we held the lock: its pages may be gone.
                raise UsageError(
                    f"parent restore point {vm}/{job.parent.id} was pruned while "
                    "this ingest started; run the ingest again"
                )
            return job.run()
