"""An ingest as the CLI asks for it: parse, validate everything, then lock and run.

All validation (names, sources, changed-block lists, parent) happens before
the repository is locked or written, so bad input never leaves a trace.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Sequence

from ingest.cbt.blocks import QEMU_BITMAP_PREFIX, cbt_id_problem, check_base
from ingest.cbt.load import load_changed_blocks
from ingest.formats.detect import FORMATS, open_source
from ingest.pipeline import DiskRequest, Ingest
from repofs.errors import SourceError, UsageError
from repofs.store.names import validate_restore_point_names, validate_vm_name
from repofs.store.opening import open_repository
from repofs.store.restorepoint import RestorePoint


def split_assignment(spec: str, what: str) -> tuple[str, str]:
    """``NAME=VALUE`` -> (NAME, VALUE), with a clear error for anything else."""
    name, sep, value = spec.partition("=")
    if not sep or not name or not value:
        raise UsageError(f"{what} {spec!r} must have the form NAME=VALUE")
    return name, value


MAX_NOTE = 1000


def validate_note(note: str | None) -> str | None:
    """An ``--note`` as it is stored: None for none; one line of printable text.

    ``list`` shows it on its restore point's line, so a newline or a tab
    would break the columns that scripts cut.
    """
    if note is None or not note.strip():
        return None
    if any(not ch.isprintable() for ch in note):
        raise UsageError("--note must be one line of printable text (no tabs or newlines)")
    if len(note) > MAX_NOTE:
        raise UsageError(f"--note is {len(note)} characters long; at most {MAX_NOTE} are kept")
    return note.strip()
def per_disk(specs: list[str] | None, option: str, disks: set[str]) -> dict[str, str]:
    """``--option DISK=VALUE`` given any number of times, at most once per disk of this ingest."""
    out: dict[str, str] = {}
    for spec in specs or []:
        name, value = split_assignment(spec, option)
        if name not in disks:
            raise UsageError(f"{option} names disk {name!r}, which is not in this ingest")
        if name in out:
            raise UsageError(f"{option} given twice for disk {name!r}")
        out[name] = value
    return out


def cbt_ids(specs: list[str] | None, option: str, disks: set[str]) -> dict[str, str]:
    """:func:`per_disk` for changed-block tracking positions, each checked."""
    out = per_disk(specs, option, disks)
    for name, value in out.items():
        problem = cbt_id_problem(value)
        if problem is not None:
            raise UsageError(f"{option} for disk {name!r} {problem}")
    return out


def formats_by_disk(specs: Sequence[str], disks: set[str]) -> dict[str, str]:
    """``--format`` values: ``FMT`` for every disk, ``DISK=FMT`` for one (which wins)."""
    every: str | None = None
    by_disk: dict[str, str] = {}
    for spec in specs:
        name, sep, fmt = spec.partition("=")
        if not sep:
            name, fmt = "", name
        if fmt not in FORMATS:
            raise UsageError(
                f"--format {spec!r}: unknown format {fmt!r}; expected one of "
                f"{', '.join(FORMATS)}, for every disk or as DISK=FORMAT"
            )
        if not sep:
            if every is not None:
                raise UsageError("--format without a disk name is given twice")
            every = fmt
            continue
        if name not in disks:
            raise UsageError(f"--format names disk {name!r}, which is not in this ingest")
        if name in by_disk:
            raise UsageError(f"--format given twice for disk {name!r}")
        by_disk[name] = fmt
    return {d: by_disk.get(d, every) for d in disks if by_disk.get(d, every) is not None}


def backing_directories(dirs: Sequence[str]) -> tuple[str, ...]:
    """``--backing-dir`` values, checked to be directories and with symlinks resolved."""
    out = []
    for d in dirs:
        if not os.path.isdir(d):
            raise UsageError(f"--backing-dir {d!r} is not a directory")
        out.append(os.path.realpath(d))
    return tuple(out)


def run_ingest(
    repo_path: str,
    vm: str,
    disk_specs: list[str],
    configs: list[str],
    *,
    formats: Sequence[str] = (),
    backing_dirs: Sequence[str] = (),
    parent_spec: str | None = None,
    changed_specs: list[str] | None = None,
    cbt_check: int = 0,
    progress: bool | None = None,
    consistency: str = "crash",
    note: str | None = None,
    position_specs: list[str] | None = None,
    base_specs: list[str] | None = None,
    on_detected: Callable[[str, str, str], None] | None = None,
) -> RestorePoint:
    """Ingest the disks as one restore point of ``vm``; validate everything before writing.

    ``on_detected(disk, path, format)`` is told each format that was
    detected rather than given, before anything is read.
    """
    validate_vm_name(vm, new=True)
    note = validate_note(note)
    pairs = [split_assignment(s, "disk") for s in disk_specs]
    if not pairs:
        raise UsageError("no disks given: name at least one DISK=SOURCE")
    validate_restore_point_names([name for name, _ in pairs], configs)
    seen = {name for name, _ in pairs}
    fmt_of = formats_by_disk(formats, seen)
    dirs = backing_directories(backing_dirs)
    changed_by_disk = per_disk(changed_specs, "--changed-blocks", seen)
    positions = cbt_ids(position_specs, "--cbt-position", seen)
    bases = cbt_ids(base_specs, "--cbt-base", seen)
    for name in bases:
        if name not in changed_by_disk:
            raise UsageError(f"--cbt-base for disk {name!r} needs its --changed-blocks")
    if cbt_check < 0:
        raise UsageError("--cbt-check must be zero or more")
    if cbt_check and not changed_by_disk:  # silently checking nothing would read as a pass
        raise UsageError("--cbt-check checks changed-block lists: give --changed-blocks too")
    if parent_spec is not None and not parent_spec.strip():
        # Never read as "no --parent": that would quietly mean the latest.
        raise UsageError("--parent is empty: give a restore point id or 'latest'")

    repo = open_repository(repo_path)
    with contextlib.ExitStack() as stack:
        stack.callback(repo.close)
        parent = repo.resolve(vm, parent_spec) if parent_spec is not None else repo.latest(vm)
        requests = []
        for name, path in pairs:
            source = open_source(path, fmt_of.get(name), backing_dirs=dirs)
            stack.callback(source.close)
            if name not in fmt_of and on_detected is not None:
                on_detected(name, path, source.format_name)
            changed = None
            if name in changed_by_disk:
                if parent is None:
                    raise UsageError(
                        f"--changed-blocks needs a parent restore point and VM {vm!r} has none"
                    )
                spec = changed_by_disk[name]
                if spec.startswith(QEMU_BITMAP_PREFIX) and source.format_name != "qcow2":
                    # qemu would probe the file's format itself, and open what a
                    # guest-made header names: only a disk we read as qcow2 goes to it.
                    raise SourceError(
                        f"{path}: --changed-blocks {name}={spec} reads a qcow2 bitmap, but "
                        f"this disk is read as {source.format_name}"
                    )
                listed = load_changed_blocks(spec, source.size, path)
                _check_list_base(name, spec, listed.base, bases.get(name), parent)
                changed = list(listed.extents)
            requests.append(DiskRequest(name, source, changed, positions.get(name)))
        job = Ingest(
            repo,
            vm,
            requests,
            configs,
            parent=parent,
            progress=progress,
            consistency=consistency,
            note=note,
        )
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


def _check_list_base(
    disk: str, spec: str, in_list: str | None, given: str | None, parent: RestorePoint
) -> None:
    """Refuse a list that does not start at the parent's position (see :func:`check_base`).

    The base is ``--cbt-base``, or the list's own ``base``, or for a qemu
    bitmap its name: a bitmap holds the changes since it was created, at
    the checkpoint the parent's ``--cbt-position`` names.
    """
    if given is not None and in_list is not None and given != in_list:
        raise UsageError(
            f"--cbt-base for disk {disk!r} is {given!r}, but {spec} says its base is {in_list!r}"
        )
    base = given if given is not None else in_list
    implied = False
    if base is None and spec.startswith(QEMU_BITMAP_PREFIX):
        base, implied = spec[len(QEMU_BITMAP_PREFIX) :], True
    pdisk = parent.disk(disk)
    if pdisk is None:  # a disk new in this restore point is read whole
        return
    warning = check_base(
        disk, base, implied=implied, parent_id=parent.id, position=pdisk.cbt_position
    )
    if warning is not None:
        print(f"repofs: warning: {warning}", file=sys.stderr, flush=True)
