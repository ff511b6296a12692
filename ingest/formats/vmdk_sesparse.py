"""SEsparse extents: the ``-sesparse.vmdk`` of ESXi 6.5+ snapshots (createType seSparse).

The format is not officially documented.  What is known (and what qemu's
read-only driver relies on): a 512-byte *constant header* of 64-bit
little-endian fields (magic ``0xcafebabe``, version ``0x200000001``,
capacity, grain size 8 sectors, grain table size 64 sectors, then offsets and
sizes in sectors of the volatile header, journal, grain directory, grain
tables, free bitmap, back map and grains), a *volatile header* (magic
``0xcafecafe``, with a flag telling whether the journal must be replayed), a
grain directory of 64-bit entries and grain tables of 4096 64-bit entries:

- directory entry 0: no table; ``0x10000000_xxxxxxxx``: table number ``x``;
- table entry top nibble 0 (must be all zero): unallocated, falls through;
  1 (unmapped) or 2 (zero): reads as zeros; 3: allocated, the grain index is
  the low 48 bits shifted up 12 joined with bits 48-59.

Because the layout is inferred rather than specified, every field the
reader does not understand must hold the one value seen in the wild.
"""

from __future__ import annotations

import array
import struct
from dataclasses import dataclass

from ingest.formats.vmdk_descriptor import MAX_DISK_SECTORS
from ingest.formats.vmdk_extent import SECTOR, ExtentFile, GrainTableExtent, TableCache, le_array
from repofs.errors import SourceError

CONST_MAGIC = 0xCAFEBABE
VOLATILE_MAGIC = 0xCAFECAFE
MAGIC_BYTES = struct.pack("<Q", CONST_MAGIC)
VERSION = 0x0000000200000001
GRAIN_SECTORS = 8
GT_SECTORS = 64
GT_ENTRIES = GT_SECTORS * SECTOR // 8
GD_ALLOCATED = 0x10000000

_CONST = struct.Struct("<26Q")
_VOLATILE = struct.Struct("<4Q")


@dataclass(frozen=True)
class SESparseHeader:
    """The constant-header fields the reader uses, in sectors as stored."""

    capacity: int
    volatile_offset: int
    gd_offset: int
    gd_size: int
    gt_offset: int
    gt_size: int
    grains_offset: int


def parse_sesparse_header(buf: bytes, path: str) -> SESparseHeader:
    """Decode and strictly check an SEsparse constant header (first 512 bytes)."""
    if len(buf) < SECTOR:
        raise SourceError(f"{path}: SEsparse header is truncated ({len(buf)} of 512 bytes)")
    (magic, version, capacity, grain, gt_size_sectors, flags, r1, r2, r3, r4,
     vol_off, _vol_size, _jh_off, _jh_size, _j_off, _j_size, gd_off, gd_size,
     gt_off, gt_size, _fb_off, _fb_size, _bm_off, _bm_size, grains_off, _grains_size,
     ) = _CONST.unpack_from(buf)
    if magic != CONST_MAGIC:
        raise SourceError(f"{path}: bad SEsparse header magic {magic:#x}, expected 0xcafebabe")
    if version != VERSION:
        raise SourceError(f"{path}: unsupported SEsparse version {version:#x}")
    if grain != GRAIN_SECTORS:
        raise SourceError(f"{path}: SEsparse grain size {grain} sectors, expected 8")
    if gt_size_sectors != GT_SECTORS:
        raise SourceError(f"{path}: SEsparse grain table size {gt_size_sectors}, expected 64")
    if flags or r1 or r2 or r3 or r4 or any(buf[_CONST.size : SECTOR]):
        raise SourceError(f"{path}: SEsparse header has unknown flags or non-zero padding")
    if capacity == 0 or capacity > MAX_DISK_SECTORS:
        raise SourceError(f"{path}: SEsparse capacity of {capacity} sectors is out of range")
    for name, value in (("volatile header", vol_off), ("grain directory", gd_off),
                        ("grain tables", gt_off), ("grains", grains_off)):
        if value == 0 or value > MAX_DISK_SECTORS:
            raise SourceError(f"{path}: SEsparse {name} offset {value} is out of range")
    if gd_size > MAX_DISK_SECTORS or gt_size > MAX_DISK_SECTORS:
        raise SourceError(f"{path}: SEsparse table sizes are out of range")
    return SESparseHeader(capacity, vol_off, gd_off, gd_size, gt_off, gt_size, grains_off)


def check_volatile_header(buf: bytes, path: str) -> None:
    """Refuse a volatile header with a bad magic or a journal that still needs replaying."""
    if len(buf) < SECTOR:
        raise SourceError(f"{path}: SEsparse volatile header is truncated")
    magic, _free_gt, _txn, replay = _VOLATILE.unpack_from(buf)
    if magic != VOLATILE_MAGIC:
        raise SourceError(
            f"{path}: bad SEsparse volatile header magic {magic:#x}, expected 0xcafecafe"
        )
    if replay:
        raise SourceError(
            f"{path}: SEsparse journal needs replaying (the snapshot was not closed cleanly); "
            "consolidate or reopen it in ESXi first"
        )
    if any(buf[_VOLATILE.size : SECTOR]):
        raise SourceError(f"{path}: SEsparse volatile header has non-zero padding")


class SESparseExtent(GrainTableExtent):
    """An SEsparse extent (4 KiB grains, 16 MiB per grain table)."""

    unit = 1  # tables are decoded to byte offsets (entries encode grain numbers)

    def __init__(
        self, file: ExtentFile, header: SESparseHeader, size: int, cache: TableCache
    ) -> None:
        path = file.path
        if header.capacity * SECTOR < size:
            raise SourceError(
                f"{path}: SEsparse capacity of {header.capacity} sectors is smaller than the "
                f"{size // SECTOR} sectors the descriptor gives it"
            )
        super().__init__(file, size, GRAIN_SECTORS * SECTOR, GT_ENTRIES, cache)
        check_volatile_header(
            file.pread(SECTOR, header.volatile_offset * SECTOR, "volatile header"), path
        )
        if header.gd_size * SECTOR // 8 < self.n_tables:
            raise SourceError(
                f"{path}: SEsparse grain directory has {header.gd_size * SECTOR // 8} entries, "
                f"but the disk needs {self.n_tables}"
            )
        self.gd = le_array(
            "Q", file.pread(self.n_tables * 8, header.gd_offset * SECTOR, "grain directory")
        )
        self.gt_start = header.gt_offset * SECTOR
        self.n_gt_slots = header.gt_size // GT_SECTORS
        self.grains_start = header.grains_offset * SECTOR

    def load_table(self, index: int) -> array.array[int] | None:
        path = self.file.path
        entry = self.gd[index]
        if entry == 0:
            return None
        number = entry & 0xFFFFFFFF
        if entry >> 32 != GD_ALLOCATED or number >= self.n_gt_slots:
            raise SourceError(
                f"{path}: grain directory entry {index} ({entry:#018x}) is not a valid "
                "grain table reference"
            )
        raw = self.file.pread(
            GT_ENTRIES * 8, self.gt_start + number * GT_ENTRIES * 8, "grain table"
        )
        entries = le_array("Q", raw)
        count = self.entries_in_extent(index)
        out = array.array("Q", bytes(8 * count))
        t_start = index * self.coverage
        file_size = self.file.size
        for i in range(count):
            e = entries[i]
            if e == 0:
                continue
            g_start = t_start + i * self.grain
            top = e >> 60
            if top in (1, 2):  # unmapped or zero: reads as zeros, masks the parent
                out[i] = 1
                continue
            if top != 3:
                raise SourceError(
                    f"{path}: grain table {index} entry {i} ({e:#018x}) has an unknown type"
                )
            grain_index = ((e >> 48) & 0xFFF) | ((e & 0xFFFF_FFFF_FFFF) << 12)
            byte = self.grains_start + grain_index * self.grain
            if byte + self.grain_need(g_start) > file_size:
                raise SourceError(
                    f"{path}: grain table {index} entry {i} points to grain {grain_index}, "
                    f"past the end of the file ({file_size} bytes)"
                )
            out[i] = byte
        return out
