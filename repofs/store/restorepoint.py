"""Restore points: one VM at one moment, as recorded in the index and in a pack."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from repofs.store.maps import MapRoot, depth_for

#: What ``ingest --consistency`` may record: how far the guest was quiesced before its snapshot.
CONSISTENCY = ("crash", "filesystem", "application")
_HEX64 = re.compile(r"[0-9a-f]{64}")


def _known(cls: type, doc: dict[str, Any]) -> dict[str, Any]:
    """``doc`` without keys ``cls`` does not know: a later format's optional fields."""
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in doc.items() if k in names}


@dataclass
class DiskInfo:
    """One disk of a restore point.

    ``read_mode`` says how its data was obtained: ``full`` (every allocated
    byte read), ``cbt`` (only the changed-block list's extents read, the rest
    taken from the parent) or ``dedup`` (everything read, deduplicated
    against the parent).

    ``cbt_position`` is the changed-block tracking position the disk was
    read at (``--cbt-position``: VMware's changeId, a qemu bitmap's name),
    so that the next incremental's list can be checked to start there.  It
    is left out of the record when there is none, so records written
    before it existed keep their exact bytes.
    """

    name: str
    capacity: int
    map_root: str
    map_depth: int
    n_chunks: int
    allocated_bytes: int
    source_format: str
    source_chain: list[str]
    read_mode: str = "full"
    bytes_read: int = 0
    bytes_new: int = 0
    chunks_read: int = 0
    cbt_position: str | None = None

    @property
    def map(self) -> MapRoot:
        return MapRoot(bytes.fromhex(self.map_root), self.map_depth, self.n_chunks)

    def inconsistency(self, chunk_size: int, page_refs: int) -> str | None:
        """Why this record disagrees with the shape of its map, or None if it does not.

        The capacity fixes the number of chunks, and that the depth of the
        map; a record whose capacity says more than its map covers read
        short (zeros in the page cache) instead of failing.
        """
        if (
            not isinstance(self.capacity, int)
            or not isinstance(self.n_chunks, int)
            or not isinstance(self.map_depth, int)
            or not isinstance(self.map_root, str)
        ):
            return f"disk {self.name}: a field of its record has the wrong type"
        want = -(-self.capacity // chunk_size) if self.capacity >= 0 else -1
        if self.capacity < 0 or self.n_chunks != want:
            return (
                f"disk {self.name}: capacity {self.capacity} needs {want} chunks of "
                f"{chunk_size} bytes, its map has {self.n_chunks}"
            )
        if self.map_depth != depth_for(self.n_chunks, page_refs):
            return (
                f"disk {self.name}: a map of {self.n_chunks} chunks has depth "
                f"{depth_for(self.n_chunks, page_refs)}, the record says {self.map_depth}"
            )
        if not _HEX64.fullmatch(self.map_root):
            return f"disk {self.name}: map root {self.map_root[:20]!r} is not 64 hex digits"
        return None


@dataclass
class ConfigFile:
    """A VM configuration file (.vmx, .ovf, libvirt XML) stored as one blob."""

    name: str
    digest: str
    size: int


@dataclass
class RestorePoint:
    vm: str
    id: str
    seq: int
    vm_seq: int
    created: float
    chunk_size: int
    parent: str | None = None
    disks: list[DiskInfo] = field(default_factory=list)
    configs: list[ConfigFile] = field(default_factory=list)
    record: list[Any] | None = None  # [pack id hex, offset] of its own record; index only
    #: format 2: how the guest was quiesced before the snapshot (one of CONSISTENCY)
    consistency: str = "crash"
    note: str | None = None  #: format 2: the administrator's words, from ``ingest --note``
    protected: bool = False  #: index only: from the newest PROTECTION record
    protected_seq: int = 0  #: index only: that record's sequence number

    @property
    def kind(self) -> str:
        modes = {d.read_mode for d in self.disks}
        if "cbt" in modes:
            return "cbt"
        return "incremental" if self.parent else "full"

    @property
    def bytes_read(self) -> int:
        return sum(d.bytes_read for d in self.disks)

    @property
    def bytes_new(self) -> int:
        return sum(d.bytes_new for d in self.disks)

    @property
    def capacity(self) -> int:
        return sum(d.capacity for d in self.disks)

    def disk(self, name: str) -> DiskInfo | None:
        return next((d for d in self.disks if d.name == name), None)

    def inconsistency(self, chunk_size: int, page_refs: int) -> str | None:
        """Why this restore point's record disagrees with its maps, or None."""
        if self.chunk_size != chunk_size:
            return f"chunk size {self.chunk_size} is not the repository's {chunk_size}"
        for d in self.disks:
            problem = d.inconsistency(chunk_size, page_refs)
            if problem is not None:
                return problem
        return None

    def to_doc(self) -> dict[str, Any]:
        """The JSON of a new restore point's record (format 2); the flag is not part of it."""
        doc = asdict(self)
        doc.pop("protected")
        doc.pop("protected_seq")
        for disk in doc["disks"]:
            if disk["cbt_position"] is None:
                del disk["cbt_position"]
        doc["format"] = 2
        return doc

    @classmethod
    def from_doc(cls, doc: dict[str, Any]) -> RestorePoint:
        """Read an index copy of any format; keys a later format added are ignored."""
        doc = _known(cls, doc)
        doc["disks"] = [DiskInfo(**_known(DiskInfo, d)) for d in doc.get("disks", [])]
        doc["configs"] = [ConfigFile(**_known(ConfigFile, c)) for c in doc.get("configs", [])]
        return cls(**doc)
