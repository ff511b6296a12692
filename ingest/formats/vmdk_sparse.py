"""Hosted sparse extents (``KDMV``): monolithicSparse, twoGbMaxExtentSparse, streamOptimized.

Layout (VMware "Virtual Disk Format" 1.1/5.0): a 512-byte header, an
optional embedded descriptor, a grain directory (GD) of 32-bit sector
pointers to grain tables (GT) of 512 32-bit sector pointers to grains, and
often a redundant copy of the GD and GTs.  streamOptimized files deflate each
grain behind a 12-byte marker (LBA, compressed size) and may put the GD at
the end, announced by ``gdOffset = GD_AT_END`` and a footer copy of the
header 1 KiB before the end of the file.

Every header field that sizes a read or an allocation is checked against
fixed limits and against the file size before it is used.
"""

from __future__ import annotations

import array
import struct
import zlib
from collections import OrderedDict
from dataclasses import dataclass

from ingest.formats import vmdk_extent
from ingest.formats.vmdk_descriptor import (
    MAX_DESCRIPTOR_BYTES,
    MAX_DISK_SECTORS,
    Descriptor,
    parse_descriptor,
)
from ingest.formats.vmdk_extent import MAX_GRAIN_BYTES, SECTOR, is_pow2, le_array
from repofs.errors import SourceError

MAGIC = b"KDMV"
GD_AT_END = 0xFFFFFFFFFFFFFFFF
FLAG_NL_DETECT = 1 << 0
FLAG_RGD = 1 << 1
FLAG_ZERO_GRAIN = 1 << 2
FLAG_COMPRESSED = 1 << 16
FLAG_MARKERS = 1 << 17
COMPRESS_NONE = 0
COMPRESS_DEFLATE = 1
GTES_PER_GT = 512
MARKER_EOS = 0
MARKER_FOOTER = 3

_HEADER = struct.Struct("<4sIIQQQQIQQQB4sH")
_MARKER = struct.Struct("<QII")
_GRAIN_MARKER = struct.Struct("<QI")
_NL_CHECK = b"\n \r\n"
#: Inflated grains kept so that unaligned reads do not inflate a grain twice.
_INFLATED_CACHE = 16
#: Largest file span read at once when fetching neighbouring compressed grains.
_MAX_SPAN = 8 << 20


@dataclass(frozen=True)
class SparseHeader:
    """The fields of a hosted sparse header, in sectors as stored."""

    version: int
    flags: int
    capacity: int
    grain: int
    desc_offset: int
    desc_size: int
    gtes: int
    rgd_offset: int
    gd_offset: int
    overhead: int
    compress: int

    @property
    def gd_at_end(self) -> bool:
        return self.gd_offset == GD_AT_END

    @property
    def compressed(self) -> bool:
        return self.compress == COMPRESS_DEFLATE


def parse_sparse_header(buf: bytes, path: str) -> SparseHeader:
    """Decode and sanity-check a 512-byte hosted sparse header.

    Checks only what the header alone can tell (magic, version, limits); the
    placement of tables inside the file is checked by :class:`SparseExtent`.
    """
    if len(buf) < SECTOR:
        raise SourceError(f"{path}: sparse header is truncated ({len(buf)} of 512 bytes)")
    (magic, version, flags, capacity, grain, desc_offset, desc_size, gtes, rgd_offset,
     gd_offset, overhead, _unclean, nl_check, compress) = _HEADER.unpack_from(buf)
    if magic != MAGIC:
        raise SourceError(f"{path}: bad sparse header magic {magic!r}, expected b'KDMV'")
    if version not in (1, 2, 3):
        raise SourceError(f"{path}: unsupported sparse header version {version}")
    if flags & FLAG_NL_DETECT and nl_check != _NL_CHECK:
        raise SourceError(
            f"{path}: newline check bytes are {nl_check!r}, not {_NL_CHECK!r}: the file was "
            "damaged, e.g. copied in text mode"
        )
    if capacity > MAX_DISK_SECTORS:
        raise SourceError(f"{path}: capacity of {capacity} sectors is absurd (over 1 PiB)")
    if not is_pow2(grain) or grain * SECTOR > MAX_GRAIN_BYTES:
        raise SourceError(
            f"{path}: grain size of {grain} sectors is not a power of two up to 2 MiB"
        )
    if gtes != GTES_PER_GT:
        raise SourceError(f"{path}: {gtes} entries per grain table, expected {GTES_PER_GT}")
    if compress not in (COMPRESS_NONE, COMPRESS_DEFLATE):
        raise SourceError(f"{path}: unknown compression algorithm {compress}")
    if desc_size > MAX_DESCRIPTOR_BYTES // SECTOR:
        raise SourceError(f"{path}: embedded descriptor of {desc_size} sectors is absurd")
    if desc_size and not desc_offset:
        raise SourceError(f"{path}: embedded descriptor has a size but no offset")
    if gd_offset == 0 and capacity:
        raise SourceError(f"{path}: grain directory offset is 0")
    if flags & FLAG_RGD and rgd_offset == 0:
        raise SourceError(f"{path}: redundant grain directory flagged but its offset is 0")
    return SparseHeader(version, flags, capacity, grain, desc_offset, desc_size, gtes,
                        rgd_offset, gd_offset, overhead, compress)


def read_footer(file: vmdk_extent.ExtentFile, path: str) -> SparseHeader:
    """Read the footer header of a streamOptimized file whose GD is at the end.

    The last three sectors are a footer marker, the footer (a copy of the
    header with the real ``gdOffset``) and an end-of-stream marker.
    """
    if file.size < 4 * SECTOR:
        raise SourceError(f"{path}: too short for a stream footer ({file.size} bytes)")
    tail = file.pread(3 * SECTOR, file.size - 3 * SECTOR, "stream footer")
    _val, size, kind = _MARKER.unpack_from(tail, 0)
    eos = _MARKER.unpack_from(tail, 2 * SECTOR)
    if size != 0 or kind != MARKER_FOOTER or eos != (0, 0, MARKER_EOS):
        raise SourceError(
            f"{path}: grain directory is at the end but no valid footer and end-of-stream "
            "marker end the file (truncated stream?)"
        )
    footer = parse_sparse_header(tail[SECTOR : 2 * SECTOR], path)
    if footer.gd_at_end:
        raise SourceError(f"{path}: stream footer does not give the grain directory offset")
    return footer


def read_embedded_descriptor(
    file: vmdk_extent.ExtentFile, header: SparseHeader
) -> Descriptor | None:
    """The descriptor stored inside a sparse file, or ``None`` when it has none."""
    if not header.desc_size:
        return None
    data = file.pread(
        header.desc_size * SECTOR, header.desc_offset * SECTOR, "embedded descriptor"
    )
    return parse_descriptor(data, file.path, embedded=True)


class SparseExtent(vmdk_extent.GrainTableExtent):
    """A hosted sparse extent, optionally stream-compressed.

    The primary GD is authoritative.  When a redundant GD is present, each
    grain table is read from both and compared: a disagreement means the
    metadata was damaged (or caught mid-update) and is an error rather than
    a guess; a copy pointing past the end of the file is ignored in favour
    of the other.
    """

    def __init__(
        self,
        file: vmdk_extent.ExtentFile,
        header: SparseHeader,
        size: int,
        cache: vmdk_extent.TableCache,
    ) -> None:
        path = file.path
        if header.gd_at_end:
            header = read_footer(file, path)
        if header.capacity * SECTOR < size:
            raise SourceError(
                f"{path}: sparse capacity of {header.capacity} sectors is smaller than the "
                f"{size // SECTOR} sectors the descriptor gives it"
            )
        if header.overhead * SECTOR > file.size:
            raise SourceError(
                f"{path}: file is truncated: {file.size} bytes, but the header says data "
                f"starts at byte {header.overhead * SECTOR}"
            )
        super().__init__(file, size, header.grain * SECTOR, GTES_PER_GT, cache)
        self.compressed = header.compressed
        self.markers = bool(header.flags & FLAG_MARKERS)
        self.zero_grain = bool(header.flags & FLAG_ZERO_GRAIN)
        self._inflated: OrderedDict[tuple[int, int], bytes] = OrderedDict()
        self.gd = self._read_directory(header.gd_offset)
        self.rgd = self._read_directory(header.rgd_offset) if header.flags & FLAG_RGD else None
        if self.gd is None and self.rgd is None:
            raise SourceError(
                f"{path}: grain directory at sector {header.gd_offset} "
                f"({self.n_tables} entries) lies past the end of the file ({file.size} bytes)"
            )

    def _read_directory(self, sector: int) -> array.array[int] | None:
        start = sector * SECTOR
        length = self.n_tables * 4
        if start + length > self.file.size:
            return None
        return le_array("I", self.file.pread(length, start, "grain directory"))

    def _raw_table(self, sector: int) -> bytes | None:
        """Table bytes; ``b""`` when not allocated; ``None`` when it points past EOF."""
        if sector == 0:
            return b""
        start = sector * SECTOR
        if start + GTES_PER_GT * 4 > self.file.size:
            return None
        return self.file.pread(GTES_PER_GT * 4, start, "grain table")

    def load_table(self, index: int) -> array.array[int] | None:
        path = self.file.path
        primary = self._raw_table(self.gd[index]) if self.gd is not None else None
        redundant = self._raw_table(self.rgd[index]) if self.rgd is not None else None
        if primary is None and redundant is None:
            which = "grain directory" if self.rgd is None else "both grain directories"
            raise SourceError(
                f"{path}: {which} entry {index} points past the end of the file"
            )
        if primary is not None and redundant is not None:
            empty = bytes(GTES_PER_GT * 4)
            if (primary or empty) != (redundant or empty):
                raise SourceError(
                    f"{path}: primary and redundant grain table {index} disagree; the "
                    "metadata is damaged or was caught mid-update"
                )
        raw = primary if primary is not None else redundant
        if not raw:
            return None
        return self._decode(index, raw)

    def _decode(self, index: int, raw: bytes) -> array.array[int]:
        entries = le_array("I", raw)
        del entries[self.entries_in_extent(index) :]  # entries past the extent are unused
        self.check_sector_table(index, entries, SECTOR, self.zero_grain)
        return entries

    def inflate(self, grains: list[tuple[int, int]]) -> dict[tuple[int, int], bytes]:
        """Inflate grains, reading neighbouring ones with one pread per run."""
        result: dict[tuple[int, int], bytes] = {}
        todo: list[tuple[int, int]] = []
        for key in sorted(set(grains)):
            hit = self._inflated.get(key)
            if hit is not None:
                self._inflated.move_to_end(key)
                result[key] = hit
            else:
                todo.append(key)
        run: list[tuple[int, int]] = []
        for item in todo:
            if run and (
                item[0] - run[-1][0] > 2 * self.grain + 4096 or item[0] - run[0][0] > _MAX_SPAN
            ):
                self._inflate_run(run, result)
                run = []
            run.append(item)
        if run:
            self._inflate_run(run, result)
        return result

    def _inflate_run(
        self, run: list[tuple[int, int]], result: dict[tuple[int, int], bytes]
    ) -> None:
        file = self.file
        start = run[0][0]
        end = min(file.size, run[-1][0] + _GRAIN_MARKER.size + self.grain + 1024)
        buf = memoryview(file.pread(end - start, start, "compressed grains"))
        for foff, gstart in run:
            rel = foff - start
            if self.markers:
                lba, clen = _GRAIN_MARKER.unpack_from(buf, rel)
                if lba * SECTOR != gstart:
                    raise SourceError(
                        f"{file.path}: grain marker at byte {foff} is for sector {lba}, but the "
                        f"grain table uses it for sector {gstart // SECTOR}"
                    )
                if clen == 0 or clen > 2 * self.grain:
                    raise SourceError(
                        f"{file.path}: grain marker at byte {foff} gives an absurd compressed "
                        f"size of {clen} bytes"
                    )
                dstart = rel + _GRAIN_MARKER.size
                if dstart + clen <= len(buf):
                    data: bytes | memoryview = buf[dstart : dstart + clen]
                else:
                    data = file.pread(clen, foff + _GRAIN_MARKER.size, "compressed grain")
            else:
                avail = min(2 * self.grain, file.size - foff)
                data = buf[rel : rel + avail] if rel + avail <= len(buf) else file.pread(
                    avail, foff, "compressed grain"
                )
            grain = self._inflate_one(data, foff, gstart)
            result[foff, gstart] = grain
            self._inflated[foff, gstart] = grain
            if len(self._inflated) > _INFLATED_CACHE:
                self._inflated.popitem(last=False)

    def _inflate_one(self, data: bytes | memoryview, foff: int, gstart: int) -> bytes:
        path = self.file.path
        need = self.grain_need(gstart)
        d = zlib.decompressobj()
        try:
            out = d.decompress(data, self.grain)
            if not d.eof and d.unconsumed_tail and d.decompress(d.unconsumed_tail, 1):
                raise SourceError(
                    f"{path}: compressed grain at byte {foff} inflates to more than the grain "
                    f"size of {self.grain} bytes"
                )
        except zlib.error as exc:
            raise SourceError(
                f"{path}: compressed grain at byte {foff} does not inflate: {exc}"
            ) from None
        if not d.eof:
            raise SourceError(
                f"{path}: compressed grain at byte {foff} is truncated (deflate stream does "
                "not end)"
            )
        if len(out) < need:
            raise SourceError(
                f"{path}: compressed grain at byte {foff} inflates to {len(out)} bytes, "
                f"expected {need}"
            )
        return out
