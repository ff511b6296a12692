"""Validation of the names an administrator chooses (VMs, disks, config files).

Names become path components in the mounted tree, so anything that could
escape a directory or confuse a shell-less consumer (tar, rsync) is refused.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Sequence

from repofs.errors import UsageError

MAX_NAME_BYTES = 200
_RP_ID = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{6}Z$")


def validate_name(kind: str, name: str, *, new: bool = False) -> str:
    """Return ``name`` if it can be a path component, else raise a one-line error.

    A ``new`` name (one an ingest is about to store) must not begin or end
    with whitespace: ``web`` and ``web `` look the same in every listing,
    and a stray blank from a script would start a second VM beside the
    first.  Looking up an existing name stays lenient, so a restore point
    stored under such a name by an older repofs can still be listed,
    verified and pruned.
    """
    if not name:
        raise UsageError(f"{kind} name is empty")
    if new and not name.strip():
        raise UsageError(f"{kind} name {name!r} is only whitespace")
    if new and name != name.strip():
        raise UsageError(f"{kind} name {name!r} begins or ends with whitespace")
    if "/" in name or "\0" in name:
        raise UsageError(f"{kind} name {name!r} must not contain '/' or NUL")
    if name in (".", ".."):
        raise UsageError(f"{kind} name {name!r} is not allowed")
    try:
        encoded = name.encode("utf-8")
    except UnicodeEncodeError:
        raise UsageError(f"{kind} name {name!r} is not valid UTF-8") from None
    if len(encoded) > MAX_NAME_BYTES:
        raise UsageError(f"{kind} name is {len(encoded)} bytes long; at most {MAX_NAME_BYTES}")
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise UsageError(f"{kind} name {name!r} contains control characters")
    return name


def validate_disk_name(name: str) -> str:
    """Disk names also must not collide with the ``-flat.vmdk`` files we derive from them."""
    validate_name("disk", name, new=True)
    if name.endswith(".vmdk"):
        raise UsageError(f"disk name {name!r} must not end in '.vmdk' (it is added)")
    if name == "latest":
        raise UsageError("disk name 'latest' is reserved")
    if '"' in name:  # qemu reads the descriptor's extent line up to the first quote
        raise UsageError(f"disk name {name!r} must not contain '\"' (the descriptor quotes it)")
    return name


def validate_vm_name(name: str, *, new: bool = False) -> str:
    return validate_name("VM", name, new=new)


def validate_restore_point_names(disks: Sequence[str], config_paths: Sequence[str]) -> None:
    """Refuse disks and config files whose files would hide one another in the mount.

    A restore point's directory holds ``X.vmdk`` and ``X-flat.vmdk`` for
    each disk X beside the config files (by their base names): disks
    ``a-flat`` and ``a`` would both claim ``a-flat.vmdk``, and the mount
    could only ever show one of them, so such a set is never stored.
    """
    seen: set[str] = set()
    for name in disks:
        validate_disk_name(name)
        if name in seen:
            raise UsageError(f"disk name {name!r} is given more than once")
        seen.add(name)
    owners: dict[str, str] = {}
    files: list[tuple[str, tuple[str, ...]]] = [
        (f"disk {d!r}", (f"{d}.vmdk", f"{d}-flat.vmdk")) for d in disks
    ]
    for path in config_paths:
        base = os.path.basename(path)
        validate_name("config file", base, new=True)
        files.append((f"config file {path!r}", (base,)))
    for owner, names in files:
        for name in names:
            if name in owners:
                raise UsageError(
                    f"{owners[name]} and {owner} would both be {name!r} in the "
                    "restore point's directory; rename one"
                )
            owners[name] = owner


def is_rp_id(text: str) -> bool:
    """True for a restore point id such as ``2026-11-24T101500Z``."""
    return bool(_RP_ID.match(text))


def rp_id_for(epoch_seconds: int) -> str:
    """The restore point id of a UTC moment: its time to the second."""
    return time.strftime("%Y-%m-%dT%H%M%SZ", time.gmtime(epoch_seconds))


def rp_id_seconds(rp_id: str) -> int:
    """Inverse of :func:`rp_id_for`."""
    import calendar

    return calendar.timegm(time.strptime(rp_id, "%Y-%m-%dT%H%M%SZ"))
