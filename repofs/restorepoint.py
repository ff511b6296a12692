"""Restore points: one VM at one moment, as recorded in the index and in a pack."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from repofs.maps import MapRoot


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

    def to_doc(self) -> dict[str, Any]:
        doc = asdict(self)
        for disk in doc["disks"]:
            if disk["cbt_position"] is None:
                del disk["cbt_position"]
        doc["format"] = 1
        return doc

    @classmethod
    def from_doc(cls, doc: dict[str, Any]) -> RestorePoint:
        doc = dict(doc)
        doc.pop("format", None)
        doc["disks"] = [DiskInfo(**d) for d in doc.get("disks", [])]
        doc["configs"] = [ConfigFile(**c) for c in doc.get("configs", [])]
        return cls(**doc)
