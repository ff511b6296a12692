"""Parsing VMDK text descriptors (stand-alone files and the copy embedded in sparse files).

A descriptor names the disk's extents, its create type and, for a snapshot
delta, its parent and the parent's content id (CID).  The parser is strict
about the lines that decide which bytes are read (extent lines, CIDs, the
parent hint) and tolerant of everything else (the ``ddb.*`` disk database,
unknown keys), because a wrong extent line silently changes the disk while an
unknown ``ddb`` key never does.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from repofs.errors import SourceError

#: A descriptor larger than this is not a descriptor (real ones are < 4 KiB);
#: the bound keeps a mis-detected multi-gigabyte file from being read whole.
MAX_DESCRIPTOR_BYTES = 1 << 20
#: Non-NUL bytes after a descriptor's terminating NUL that still count as
#: one (qemu's leftovers are at most eight: see looks_like_descriptor).
MAX_STALE_TAIL = 64

#: Largest virtual disk accepted: 1 PiB.  VMware's own limit is 62 TB, so a
#: larger capacity is a damaged header, and bounding it keeps every table size
#: derived from it finite.
MAX_DISK_BYTES = 1 << 50
MAX_DISK_SECTORS = MAX_DISK_BYTES // 512

#: createType values whose extents this package can read.  Others (raw device
#: mappings, physical disks) describe storage that is not in the files.
SUPPORTED_CREATE_TYPES = frozenset(
    {
        "monolithicSparse",
        "monolithicFlat",
        "twoGbMaxExtentSparse",
        "twoGbMaxExtentFlat",
        "streamOptimized",
        "vmfs",
        "vmfsThin",
        "vmfsPreallocated",
        "vmfsEagerZeroedThick",
        "vmfsSparse",
        "seSparse",
        "custom",
    }
)
DEVICE_CREATE_TYPES = frozenset(
    {
        "vmfsRaw",
        "vmfsRDM",
        "vmfsRDMP",
        "vmfsRawDeviceMap",
        "vmfsPassthroughRawDeviceMap",
        "fullDevice",
        "partitionedDevice",
    }
)

#: Extent types and whether they name a file.
EXTENT_TYPES = {
    "FLAT": True,
    "VMFS": True,
    "SPARSE": True,
    "VMFSSPARSE": True,
    "SESPARSE": True,
    "ZERO": False,
}
DEVICE_EXTENT_TYPES = frozenset({"VMFSRDM", "VMFSRAW"})

NO_PARENT_CID = 0xFFFFFFFF

_EXTENT_RE = re.compile(
    r'(RW|RDONLY|NOACCESS)\s+(\d{1,20})\s+([A-Za-z]{1,20})'
    r'(?:\s+"([^"]*)"(?:\s+(\d{1,20}))?)?'
)
_CID_RE = re.compile(r"[0-9a-fA-F]{1,8}")
_CREATE_TYPE_RE = re.compile(r"[A-Za-z0-9]{1,40}")
_UNIQUE_KEYS = ("CID", "parentCID", "createType", "parentFileNameHint")


@dataclass(frozen=True)
class ExtentLine:
    """One ``RW <sectors> <TYPE> "<file>" [<offset>]`` line."""

    access: str
    sectors: int
    kind: str
    filename: str | None
    offset: int  # in sectors, FLAT/VMFS only


@dataclass(frozen=True)
class Descriptor:
    """The fields of a descriptor that decide what the disk contains."""

    create_type: str | None
    cid: int | None
    parent_cid: int | None  # None when the disk has no parent (ffffffff)
    parent_hint: str | None
    extents: tuple[ExtentLine, ...]
    ddb: dict[str, str] = field(default_factory=dict)

    @property
    def sectors(self) -> int:
        return sum(e.sectors for e in self.extents)


def show(text: str, limit: int | None = 80) -> str:
    """Render untrusted text for a one-line message: no control characters, bounded.

    Names from descriptors may hold undecodable bytes (kept as surrogates so
    they still open the right file); printing those would raise, so messages
    get a replacement character instead.
    """
    if text.isprintable() and (limit is None or len(text) <= limit):
        return text
    text = text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    cut = text if limit is None else text[:limit]
    out = "".join(c if c.isprintable() else "?" for c in cut)
    return out + ("..." if len(cut) < len(text) else "")


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] == '"':
        return value[1:-1]
    return value


def _parse_cid(value: str, key: str, path: str, lineno: int) -> int:
    if not _CID_RE.fullmatch(value):
        raise SourceError(
            f"{path}: descriptor line {lineno}: {key} {show(value)!r} is not 1-8 hex digits"
        )
    return int(value, 16)


def _parse_extent(
    m: re.Match[str], path: str, lineno: int, line: str, embedded: bool
) -> ExtentLine:
    access, sectors_s, kind, filename, offset_s = m.groups()
    sectors = int(sectors_s)
    where = f"{path}: descriptor line {lineno} ({show(line)!r})"
    if kind in DEVICE_EXTENT_TYPES:
        raise SourceError(
            f"{where}: raw device mapping extents are not supported; back up the device itself"
        )
    if kind not in EXTENT_TYPES:
        raise SourceError(f"{where}: unknown extent type {show(kind)!r}")
    if access == "NOACCESS":
        raise SourceError(f"{where}: extent is NOACCESS, its data cannot be read")
    if sectors == 0 or sectors > MAX_DISK_SECTORS:
        raise SourceError(f"{where}: extent size {sectors} sectors is out of range")
    if EXTENT_TYPES[kind]:
        # An embedded descriptor's extent is the sparse file itself: mkimg names it "".
        self_named = embedded and filename == "" and kind == "SPARSE"
        if not filename and not self_named:
            raise SourceError(f"{where}: {kind} extent needs a quoted file name")
        if "\0" in filename:
            raise SourceError(f"{where}: extent file name contains a NUL byte")
    elif filename is not None:
        raise SourceError(f"{where}: {kind} extent takes no file name")
    offset = 0
    if offset_s is not None:
        if kind not in ("FLAT", "VMFS"):
            raise SourceError(f"{where}: only FLAT/VMFS extents take an offset")
        offset = int(offset_s)
        if offset > MAX_DISK_SECTORS:
            raise SourceError(f"{where}: extent offset {offset} sectors is out of range")
    return ExtentLine(access, sectors, kind, filename, offset)


def parse_descriptor(data: bytes, path: str, *, embedded: bool = False) -> Descriptor:
    """Parse descriptor text, raising :class:`SourceError` naming ``path`` for anything wrong.

    Every descriptor is read as a C string, up to its first NUL, as qemu
    reads it.  ``embedded`` descriptors (inside a sparse file) need no
    extent lines: the sparse file itself is the extent, which is why their
    ``SPARSE`` line may name it ``""`` (FreeBSD's mkimg does).  Text is
    decoded as UTF-8 with ``surrogateescape`` so that non-UTF-8 file names
    still map back to the exact bytes on disk.
    """
    if len(data) > MAX_DESCRIPTOR_BYTES:
        raise SourceError(
            f"{path}: descriptor is {len(data)} bytes, more than the "
            f"{MAX_DESCRIPTOR_BYTES} a descriptor can be"
        )
    data = data.partition(b"\0")[0]  # a C string: see looks_like_descriptor
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    text = data.decode("utf-8", "surrogateescape")

    values: dict[str, str] = {}
    linenos: dict[str, int] = {}
    ddb: dict[str, str] = {}
    extents: list[ExtentLine] = []
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        m = _EXTENT_RE.fullmatch(line)
        if m:
            extents.append(_parse_extent(m, path, lineno, line, embedded))
            continue
        if line.split(None, 1)[0] in ("RW", "RDONLY", "NOACCESS"):
            raise SourceError(f"{path}: descriptor line {lineno}: bad extent line {show(line)!r}")
        key, eq, value = line.partition("=")
        key = key.strip()
        if not eq or not key:
            raise SourceError(
                f"{path}: descriptor line {lineno} is neither key=value nor an extent: "
                f"{show(line)!r}"
            )
        value = _unquote(value.strip())
        if key.startswith("ddb."):
            ddb[key] = value
            continue
        if key in _UNIQUE_KEYS and key in values:
            raise SourceError(f"{path}: descriptor line {lineno}: {key} is given twice")
        values[key] = value
        linenos[key] = lineno

    create_type = values.get("createType")
    if create_type is not None:
        if create_type in DEVICE_CREATE_TYPES:
            raise SourceError(
                f"{path}: createType {create_type!r} maps a physical device; "
                "back up the device itself"
            )
        if not _CREATE_TYPE_RE.fullmatch(create_type) or (
            create_type not in SUPPORTED_CREATE_TYPES
        ):
            raise SourceError(f"{path}: unsupported createType {show(create_type)!r}")
    elif not embedded:
        raise SourceError(f"{path}: descriptor has no createType")

    if values.get("isNativeSnapshot", "no").lower() not in ("no", "false", "0"):
        raise SourceError(f"{path}: native (array-offloaded) snapshots are not supported")

    cid = _parse_cid(values["CID"], "CID", path, linenos["CID"]) if "CID" in values else None
    parent_cid: int | None = None
    if "parentCID" in values:
        parent_cid = _parse_cid(
            values["parentCID"], "parentCID", path, linenos["parentCID"]
        )
        if parent_cid == NO_PARENT_CID:
            parent_cid = None
    parent_hint = values.get("parentFileNameHint") or None
    if parent_hint is not None:
        if "\0" in parent_hint:
            raise SourceError(f"{path}: parentFileNameHint contains a NUL byte")
        if parent_cid is None:
            raise SourceError(
                f"{path}: names parent {show(parent_hint)!r} but has no parentCID "
                "(or parentCID=ffffffff)"
            )
    if not extents and not embedded:
        raise SourceError(f"{path}: descriptor lists no extents")
    total = sum(e.sectors for e in extents)
    if total > MAX_DISK_SECTORS:
        raise SourceError(f"{path}: extents add up to {total} sectors, more than 1 PiB")
    return Descriptor(create_type, cid, parent_cid, parent_hint, tuple(extents), ddb)


def looks_like_descriptor(head: bytes) -> bool:
    """Whether the first bytes of a file are a VMDK text descriptor.

    A descriptor is text up to its first NUL (a C string, as qemu reads it)
    with either the customary first line or a ``createType=`` line.  qemu
    pads it with NULs, and when it rewrites the CID it prints the new one
    without leading zeros, so a shorter text leaves the old one's last few
    bytes after the NUL: about one qemu-written descriptor in sixteen.
    More than :data:`MAX_STALE_TAIL` such bytes is binary data, which keeps
    a disk image from ever being mistaken for a descriptor.
    """
    text, _nul, rest = head.partition(b"\0")
    if len(rest) - rest.count(0) > MAX_STALE_TAIL:
        return False
    if text.startswith(b"\xef\xbb\xbf"):
        text = text[3:]
    if text.lstrip().startswith(b"# Disk DescriptorFile"):
        return True
    return re.search(rb"(?m)^[ \t]*createType[ \t]*=", text) is not None
