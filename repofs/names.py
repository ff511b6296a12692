"""Validation of the names an administrator chooses (VMs, disks, config files).

Names become path components in the mounted tree, so anything that could
escape a directory or confuse a shell-less consumer (tar, rsync) is refused.
"""

from __future__ import annotations

import re
import time

from repofs.errors import UsageError

MAX_NAME_BYTES = 200
_RP_ID = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{6}Z$")


def validate_name(kind: str, name: str) -> str:
    """Return ``name`` if it can be a path component, else raise a one-line error."""
    if not name:
        raise UsageError(f"{kind} name is empty")
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
    validate_name("disk", name)
    if name.endswith(".vmdk"):
        raise UsageError(f"disk name {name!r} must not end in '.vmdk' (it is added)")
    if name == "latest":
        raise UsageError("disk name 'latest' is reserved")
    return name


def validate_vm_name(name: str) -> str:
    return validate_name("VM", name)


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
