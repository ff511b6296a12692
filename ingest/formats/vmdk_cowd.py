"""ESX Server sparse extents (``COWD``): the ``-delta.vmdk`` of vmfsSparse snapshots.

Layout (VMware "Virtual Disk Format" 1.1, "ESX Server Sparse Extents"): a
2048-byte header of 32-bit little-endian fields (magic ``COWD``, version 1,
flags, capacity in sectors, grain size in sectors, GD offset in sectors,
number of GD entries, next free sector, then parent name and geometry that
the descriptor supersedes), a grain directory of 32-bit sector pointers to
grain tables of 4096 32-bit sector pointers to grains.  There is no zeroed
grain marker and no compression; an unallocated grain falls through to the
parent named by the descriptor.
"""

from __future__ import annotations

import array
import struct
from dataclasses import dataclass

from ingest.formats import vmdk_extent
from ingest.formats.vmdk_extent import MAX_GRAIN_BYTES, SECTOR, is_pow2, le_array
from repofs.errors import SourceError

MAGIC = b"COWD"
HEADER_BYTES = 2048
GT_ENTRIES = 4096

_HEADER = struct.Struct("<4sIIIIIII")


@dataclass(frozen=True)
class CowdHeader:
    """The fields of a COWD header that locate data, in sectors as stored."""

    version: int
    flags: int
    capacity: int
    grain: int
    gd_offset: int
    gd_entries: int
    free_sector: int

    @property
    def tables_needed(self) -> int:
        return -(-self.capacity // (self.grain * GT_ENTRIES))


def parse_cowd_header(buf: bytes, path: str) -> CowdHeader:
    """Decode and sanity-check a COWD header (the first 2048 bytes of the file)."""
    if len(buf) < HEADER_BYTES:
        raise SourceError(
            f"{path}: COWD header is truncated ({len(buf)} of {HEADER_BYTES} bytes)"
        )
    magic, version, flags, capacity, grain, gd_offset, gd_entries, free_sector = (
        _HEADER.unpack_from(buf)
    )
    if magic != MAGIC:
        raise SourceError(f"{path}: bad COWD magic {magic!r}, expected b'COWD'")
    if version != 1:
        raise SourceError(f"{path}: unsupported COWD version {version}")
    if capacity == 0:
        raise SourceError(f"{path}: COWD capacity is zero")
    if not is_pow2(grain) or grain * SECTOR > MAX_GRAIN_BYTES:
        raise SourceError(
            f"{path}: COWD grain size of {grain} sectors is not a power of two up to 2 MiB"
        )
    if gd_offset * SECTOR < HEADER_BYTES:
        raise SourceError(f"{path}: COWD grain directory at sector {gd_offset} overlaps the header")
    header = CowdHeader(version, flags, capacity, grain, gd_offset, gd_entries, free_sector)
    if gd_entries < header.tables_needed:
        raise SourceError(
            f"{path}: COWD grain directory has {gd_entries} entries, but {capacity} sectors "
            f"need {header.tables_needed}"
        )
    return header


class CowdExtent(vmdk_extent.GrainTableExtent):
    """A COWD extent; grain and table pointers are checked against the file size."""

    def __init__(
        self,
        file: vmdk_extent.ExtentFile,
        header: CowdHeader,
        size: int,
        cache: vmdk_extent.TableCache,
    ) -> None:
        if header.capacity * SECTOR < size:
            raise SourceError(
                f"{file.path}: COWD capacity of {header.capacity} sectors is smaller than the "
                f"{size // SECTOR} sectors the descriptor gives it"
            )
        super().__init__(file, size, header.grain * SECTOR, GT_ENTRIES, cache)
        length = self.n_tables * 4
        self.gd = le_array("I", file.pread(length, header.gd_offset * SECTOR, "grain directory"))

    def load_table(self, index: int) -> array.array[int] | None:
        path = self.file.path
        sector = self.gd[index]
        if sector == 0:
            return None
        start = sector * SECTOR
        if start < HEADER_BYTES or start + GT_ENTRIES * 4 > self.file.size:
            raise SourceError(
                f"{path}: grain directory entry {index} points to sector {sector}, outside the "
                f"file's table area ({self.file.size} bytes)"
            )
        entries = le_array("I", self.file.pread(GT_ENTRIES * 4, start, "grain table"))
        del entries[self.entries_in_extent(index) :]
        self.check_sector_table(index, entries, HEADER_BYTES, zero_ok=None)
        return entries
