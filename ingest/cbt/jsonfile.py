"""Changed-block lists saved as JSON: the repofs form and the VMware form.

Both forms are told apart by their keys (``block_size``/``extents`` versus
``startOffset``/``changedArea``), so an administrator never has to say which
one a file is.  Validation is strict because a list that silently omits a
change produces a restore point with stale data; see ``docs/cbt.md`` for the
rules and the reasons behind each.
"""

from __future__ import annotations

import json
from typing import Any, NoReturn

from ingest.cbt.blocks import ChangedBlocks, cbt_id_problem
from ingest.formats.raw import read_small_file
from ingest.formats.source import Extent
from repofs.errors import SourceError

REPOFS_KEYS = frozenset({"block_size", "extents", "capacity", "base"})
#: Lower-cased: PowerCLI writes ``StartOffset``, pyVmomi ``startOffset``.
VMWARE_KEYS = frozenset({"startoffset", "length", "changedarea"})
#: Keys that carry a type name in JSON dumps of vSphere data objects
#: (pyVmomi's encoder writes ``_vimtype``, the vSphere JSON API ``_typeName``).
TYPE_KEYS = ("_vimtype", "_typename")
#: 128 MiB hold about 3 million changed areas (1.5 million as ConvertTo-Json
#: indents them), far more than a real list; parsing that much takes about
#: 1 GiB of memory, where a FIFO or /dev/zero without a limit took it all.
MAX_LIST_BYTES = 128 * 1024 * 1024


def _short(value: object) -> str:
    """``repr`` cut short so a bad value cannot turn an error into a page."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


class _Reader:
    """Validation helpers that put the file name in front of every message."""

    def __init__(self, path: str) -> None:
        self.path = path

    def fail(self, what: str) -> NoReturn:
        raise SourceError(f"{self.path}: {what}")

    def integer(self, value: object, where: str) -> int:
        # bool is an int subclass and 65536.0 compares equal to 65536; both
        # mean the writer is confused about the format, so neither passes.
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(f"{where} must be an integer, not {_short(value)}")
        return value


def _reject_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not a number JSON allows")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise ValueError(f"duplicate key {key!r}")
        obj[key] = value
    return obj


def _read_json(path: str) -> Any:
    """Parse ``path``, turning every failure into a one-line :class:`SourceError`."""
    data = read_small_file(path, MAX_LIST_BYTES, "changed-block list")
    if not data.strip():
        raise SourceError(f"{path}: changed-block list is empty")
    try:
        # Bytes, not str: json detects UTF-8 (with or without BOM), UTF-16 and
        # UTF-32, which covers what PowerShell's Out-File writes on Windows.
        return json.loads(data, object_pairs_hook=_no_duplicates, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        raise SourceError(
            f"{path}: malformed JSON at line {exc.lineno} column {exc.colno}: {exc.msg}"
        ) from None
    except UnicodeDecodeError:
        raise SourceError(f"{path}: not UTF-8, UTF-16 or UTF-32 text") from None
    except (ValueError, RecursionError) as exc:
        raise SourceError(f"{path}: malformed JSON: {exc}") from None


def load_json_changed_blocks(path: str, capacity: int) -> ChangedBlocks:
    """Load a repofs or VMware JSON changed-block list for a disk of ``capacity`` bytes."""
    doc = _read_json(path)
    rd = _Reader(path)
    if isinstance(doc, list):
        if not doc:
            rd.fail("empty list: expected one or more QueryChangedDiskAreas results")
        return _load_vmware(rd, doc, capacity)
    if isinstance(doc, dict):
        keys = set(doc)
        lower = {k.lower() for k in keys}
        is_repofs = bool(keys & {"block_size", "extents"})
        is_vmware = bool(lower & {"startoffset", "changedarea"})
        if is_repofs and is_vmware:
            rd.fail(
                "has keys of both the repofs form (block_size, extents) and the VMware "
                "form (startOffset, changedArea)"
            )
        if is_repofs:
            return _load_repofs(rd, doc, capacity)
        if is_vmware:
            return _load_vmware(rd, [doc], capacity)
    rd.fail(
        "neither a repofs changed-block list (an object with block_size and extents) "
        "nor a VMware QueryChangedDiskAreas result (startOffset, length, changedArea)"
    )


# -- repofs form -----------------------------------------------------------


def _load_repofs(rd: _Reader, doc: dict[str, Any], capacity: int) -> ChangedBlocks:
    """Validate ``{"block_size": B, "extents": [[offset, length], ...]}``.

    Offsets and lengths must be multiples of ``block_size`` (an extent may
    stop short at the capacity, or run on to the end of the disk's last
    partial block, where it is clipped).  Requiring alignment catches the
    most dangerous writer bug, extents in sectors or KiB instead of bytes,
    which rounding would silently turn into a list that misses changes.
    """
    unknown = sorted(set(doc) - REPOFS_KEYS)
    if unknown:
        rd.fail(
            f"unknown key {unknown[0]!r} (a repofs list has block_size, extents, capacity, base)"
        )
    for key in ("block_size", "extents"):
        if key not in doc:
            rd.fail(f"missing {key!r}")
    block_size = rd.integer(doc["block_size"], "block_size")
    if block_size < 512 or block_size & (block_size - 1):
        rd.fail(f"block_size {block_size} is not a power of two of at least 512")
    if "capacity" in doc:
        declared = rd.integer(doc["capacity"], "capacity")
        if declared != capacity:
            rd.fail(f"list is for a disk of {declared} bytes, but the disk has {capacity}")
    base = doc.get("base")
    if "base" in doc:
        problem = cbt_id_problem(base)
        if problem is not None:
            rd.fail(f"base {_short(base)} {problem}")
    raw = doc["extents"]
    if not isinstance(raw, list):
        rd.fail(f"extents must be a list of [offset, length] pairs, not {_short(raw)}")
    # The last block may be partial; a tracker that marks it whole is right.
    limit = -(-capacity // block_size) * block_size
    extents: list[Extent] = []
    for i, item in enumerate(raw):
        where = f"extents[{i}]"
        if not isinstance(item, list) or len(item) != 2:
            rd.fail(f"{where} must be an [offset, length] pair, not {_short(item)}")
        off = rd.integer(item[0], f"{where} offset")
        length = rd.integer(item[1], f"{where} length")
        if off < 0:
            rd.fail(f"{where} offset {off} is negative")
        if length <= 0:
            rd.fail(f"{where} length {length} is not positive")
        end = off + length
        if off >= capacity or end > limit:
            rd.fail(f"{where} [{off}, {end}) lies beyond the end of the disk ({capacity} bytes)")
        if off % block_size:
            rd.fail(f"{where} offset {off} is not a multiple of block_size {block_size}")
        if length % block_size and end < capacity:
            rd.fail(f"{where} length {length} is not a multiple of block_size {block_size}")
        extents.append((off, min(end, capacity) - off))
    return ChangedBlocks(capacity, extents, granularity=block_size, origin="repofs-json", base=base)


# -- VMware form -----------------------------------------------------------


def _fields(rd: _Reader, obj: dict[str, Any], where: str) -> dict[str, Any]:
    """Lower-case the keys of a vSphere object, rejecting clashes like Length/length."""
    out: dict[str, Any] = {}
    for key, value in obj.items():
        low = key.lower()
        if low in out:
            rd.fail(f"{where} has key {key!r} twice in different case")
        out[low] = value
    return out


def _check_type(rd: _Reader, fields: dict[str, Any], expected: str, where: str) -> None:
    """Reject an object whose vSphere type tag names some other type.

    Unknown keys are ignored (the API adds fields across versions), but a
    dump of the wrong object, such as a VirtualDisk, must not pass as an
    empty list of changes.
    """
    for key in TYPE_KEYS:
        tag = fields.get(key)
        if tag is not None and (not isinstance(tag, str) or not tag.endswith(expected)):
            rd.fail(f"{where} is a {_short(tag)}, not a {expected}")


def _load_vmware(rd: _Reader, pages: list[Any], capacity: int) -> ChangedBlocks:
    """Validate one or more ``DiskChangeInfo`` results and merge their areas.

    VADP callers query a large disk in pages, each result covering
    ``[startOffset, startOffset + length)``, and loop until the whole disk is
    covered.  The results together must cover the whole disk: a caller that
    stopped early has said nothing about the rest, and treating the rest as
    unchanged would lose data.
    """
    extents: list[Extent] = []
    covered: list[tuple[int, int]] = []
    many = len(pages) > 1
    for p, page in enumerate(pages):
        where = f"result [{p}]" if many else "result"
        if not isinstance(page, dict):
            rd.fail(f"{where} must be a QueryChangedDiskAreas object, not {_short(page)}")
        fields = _fields(rd, page, where)
        _check_type(rd, fields, "DiskChangeInfo", where)
        for key, name in (("startoffset", "startOffset"), ("length", "length")):
            if key not in fields:
                rd.fail(f"{where} is missing {name!r}")
        start = rd.integer(fields["startoffset"], f"{where} startOffset")
        length = rd.integer(fields["length"], f"{where} length")
        if start < 0 or length < 0:
            rd.fail(f"{where} startOffset {start} or length {length} is negative")
        end = start + length
        if end > capacity:
            rd.fail(f"{where} [{start}, {end}) lies beyond the end of the disk ({capacity} bytes)")
        covered.append((start, end))
        # The API leaves changedArea out when a range has no changes.
        areas = fields.get("changedarea", [])
        if not isinstance(areas, list):
            rd.fail(f"{where} changedArea must be a list, not {_short(areas)}")
        for a, area in enumerate(areas):
            awhere = f"{where} changedArea[{a}]"
            if isinstance(area, str):
                # ConvertTo-Json without -Depth writes nested objects as
                # their type name; say so rather than "not an object".
                rd.fail(f"{awhere} is the string {_short(area)} (ConvertTo-Json needs -Depth)")
            if not isinstance(area, dict):
                rd.fail(f"{awhere} must be an object with start and length, not {_short(area)}")
            afields = _fields(rd, area, awhere)
            _check_type(rd, afields, "DiskChangeExtent", awhere)
            for key in ("start", "length"):
                if key not in afields:
                    rd.fail(f"{awhere} is missing {key!r}")
            astart = rd.integer(afields["start"], f"{awhere} start")
            alength = rd.integer(afields["length"], f"{awhere} length")
            if alength <= 0:
                rd.fail(f"{awhere} length {alength} is not positive")
            if astart < start or astart + alength > end:
                rd.fail(
                    f"{awhere} [{astart}, {astart + alength}) lies outside its result's "
                    f"range [{start}, {end})"
                )
            extents.append((astart, alength))
    reached = 0
    for start, end in sorted(covered):
        if start > reached:
            break
        reached = max(reached, end)
    if reached < capacity:
        rd.fail(
            f"the results leave the disk uncovered from byte {reached} (capacity {capacity}); "
            "keep calling QueryChangedDiskAreas until the whole disk is covered"
        )
    return ChangedBlocks(capacity, extents, granularity=1, origin="vmware-json")
