"""Microsoft VHD ("vpc") images: fixed, dynamic and differencing, read-only.

Layout (Microsoft Virtual Hard Disk Image Format Specification): a 512-byte
footer at the end of the file (and a copy at offset 0 for dynamic and
differencing disks); dynamic/differencing disks add a 1 KiB dynamic header,
a BAT of big-endian sector offsets and blocks that each start with a sector
bitmap (MSB first: bit 7 of byte 0 is the first sector).

The virtual size follows qemu's rule (see :func:`virtual_size`) so a backup
of a VHD has the size ``qemu-img convert -O raw`` gives, except that a
``current_size`` that is no multiple of 512 is rounded up to whole sectors
(qemu drops the partial one; see docs/formats-qcow2-vhd.md).
"""

from __future__ import annotations

import os
import struct
import urllib.parse
import uuid
from collections.abc import Iterable

from ingest.formats import imgutil
from ingest.formats.imgutil import BACKING, DATA, ZERO, bit_runs, msb_bitmap_to_int

FOOTER_COOKIE = b"conectix"
HEADER_COOKIE = b"cxsparse"
FIXED, DYNAMIC, DIFFERENCING = 2, 3, 4
TYPE_NAMES = {FIXED: "fixed", DYNAMIC: "dynamic", DIFFERENCING: "differencing"}
UNALLOCATED = 0xFFFFFFFF
#: CHS geometry 65535/16/255: the "maximum" that makes qemu trust current_size.
MAX_CHS_SECTORS = 65535 * 16 * 255
#: Creator applications whose footer current_size qemu trusts over the CHS geometry.
SIZE_CREATORS = (b"win ", b"qem2", b"d2v ", b"CTXS", b"tap\0")
MIN_BLOCK, MAX_BLOCK = 512, 256 * 1024 * 1024


def vhd_checksum(data: bytes, field: int) -> int:
    """One's complement of the byte sum, with the 4-byte checksum field at ``field`` as zero."""
    total = sum(data) - sum(data[field : field + 4])
    return ~total & 0xFFFFFFFF


def parse_footer(buf: bytes) -> dict | None:
    """Decode a 512-byte footer; None if the cookie or checksum is wrong."""
    if len(buf) < 512 or buf[:8] != FOOTER_COOKIE:
        return None
    (checksum,) = struct.unpack_from(">I", buf, 64)
    if vhd_checksum(buf[:512], 64) != checksum:
        return None
    (data_offset,) = struct.unpack_from(">Q", buf, 16)
    _orig_size, cur_size, cyls, heads, secs, dtype = struct.unpack_from(">QQHBBI", buf, 40)
    return {
        "data_offset": data_offset,
        "creator_app": buf[28:32],
        "current_size": cur_size,
        "chs": cyls * heads * secs,
        "type": dtype,
        "uuid": uuid.UUID(bytes=buf[68:84]),
    }


def virtual_size(footer: dict) -> int:
    """The capacity qemu reports for a VHD.

    Virtual PC and old qemu wrote sizes rounded to a CHS geometry and read the
    geometry back; Hyper-V, Disk2vhd, XenServer and qemu with ``force_size``
    ('qem2') use ``current_size``.  qemu picks by the creator application
    and uses ``current_size`` whenever the geometry is the maximum one (disks
    above ~127 GiB), so we do the same.
    """
    if footer["creator_app"] in SIZE_CREATORS or footer["chs"] == MAX_CHS_SECTORS:
        return footer["current_size"]
    return footer["chs"] * 512


def is_fixed_footer(buf: bytes) -> bool:
    """Whether ``buf``, a file's last 512 bytes, is a valid footer of a fixed VHD."""
    footer = parse_footer(buf)
    return footer is not None and footer["type"] == FIXED


class VhdSource(imgutil.LayeredSource):
    """A VHD image; a differencing disk reads through its parent."""

    def _parse(self) -> None:
        if self.file_size < 512:
            raise self.fail(f"too small to be a VHD image ({self.file_size} bytes)")
        footer = parse_footer(self.pread(0, 512))
        if footer is None or footer["type"] == FIXED:
            tail = parse_footer(self.pread(self.file_size - 512, 512))
            if tail is None:
                head = self.pread(0, 8)
                tail_cookie = self.pread(self.file_size - 512, 8)
                if FOOTER_COOKIE in (head, tail_cookie):
                    raise self.fail("VHD footer checksum is wrong (corrupt footer)")
                raise self.fail("not a VHD image (no 'conectix' footer)")
            footer = tail
        self.unique_id: uuid.UUID = footer["uuid"]
        dtype = footer["type"]
        if dtype not in TYPE_NAMES:
            raise self.fail(f"unsupported VHD disk type {dtype}")
        self._type = dtype
        self.format_name = f"vhd:{TYPE_NAMES[dtype]}"
        self._size = virtual_size(footer)
        if dtype == FIXED:
            data_end = self.file_size - 512
            if self._size > data_end:
                raise self.fail(
                    f"fixed VHD of {self._size} bytes holds only {data_end} bytes of data "
                    f"(file is truncated)"
                )
            return
        self._parse_dynamic(footer)

    def _parse_dynamic(self, footer: dict) -> None:
        hoff = footer["data_offset"]
        if hoff + 1024 > self.file_size:
            raise self.fail(f"dynamic header offset {hoff} is past the end of the file")
        hdr = self.pread(hoff, 1024)
        if hdr[:8] != HEADER_COOKIE:
            raise self.fail("dynamic disk header has a bad cookie (expected 'cxsparse')")
        (checksum,) = struct.unpack_from(">I", hdr, 36)
        if vhd_checksum(hdr, 36) != checksum:
            raise self.fail("dynamic disk header checksum is wrong (corrupt header)")
        table_off, _ver, max_entries, block_size = struct.unpack_from(">QIII", hdr, 16)
        if block_size < MIN_BLOCK or block_size > MAX_BLOCK or block_size & (block_size - 1):
            raise self.fail(f"absurd block size {block_size}")
        self._block_size = block_size
        nblocks = (self._size + block_size - 1) // block_size
        if max_entries < nblocks:
            raise self.fail(
                f"BAT has {max_entries} entries but {nblocks} are needed for {self._size} bytes"
            )
        self._bat = imgutil.TableCache(self, "BAT", table_off, nblocks, 4, True)
        sectors = block_size // 512
        self._bitmap_size = ((sectors + 7) // 8 + 511) // 512 * 512
        self._bitmaps = imgutil.LRU(256)
        self._full_bitmap = (1 << sectors) - 1
        if self._type == DIFFERENCING:
            self._open_parent(hdr)

    # -- parent -----------------------------------------------------------------

    def _parent_candidates(self, hdr: bytes) -> dict[str, str]:
        """Possible local paths of the parent, most trustworthy first, to the text naming each."""
        by_code: dict[bytes, list[str]] = {}
        for i in range(8):
            code, _space, dlen, _res, doff = struct.unpack_from(">4sIIIQ", hdr, 576 + 24 * i)
            if code == b"\0\0\0\0" or dlen == 0:
                continue
            if dlen > 65536 or doff + dlen > self.file_size:
                raise self.fail(f"parent locator {i} ({code!r}) lies outside the file")
            raw = self.pread(doff, dlen)
            if code in (b"W2ru", b"W2ku"):
                name = raw.decode("utf-16-le", "replace").split("\0", 1)[0]
            elif code == b"MacX":
                name = raw.decode("utf-8", "replace").split("\0", 1)[0]
            else:
                continue
            by_code.setdefault(code, []).append(name)
        here = os.path.dirname(self.path)
        out: list[tuple[str, str]] = []
        for name in by_code.get(b"W2ru", []):
            out.append((_windows_path(here, name), name))
        for name in by_code.get(b"MacX", []):
            path = name
            if path.startswith("file://"):
                path = urllib.parse.unquote(path[7:])
                if path.startswith("localhost/"):
                    path = path[9:]
            out.append((path if os.path.isabs(path) else os.path.join(here, path), name))
        for name in by_code.get(b"W2ku", []):
            out.append((_windows_path(here, name), name))
        unicode_name = hdr[64:576].decode("utf-16-be", "replace").split("\0", 1)[0]
        if unicode_name:
            out.append((_windows_path(here, unicode_name), unicode_name))
        candidates: dict[str, str] = {}
        for path, name in out:
            if path:
                candidates.setdefault(path, name)
        return candidates

    def _open_parent(self, hdr: bytes) -> None:
        expected = uuid.UUID(bytes=hdr[40:56])
        candidates = self._parent_candidates(hdr)
        if not candidates:
            raise self.fail("differencing VHD has no usable parent locator")
        found, parent = self._open_parent_of(candidates, VhdSource, "VHD")
        if parent.unique_id != expected:
            raise self.fail(
                f"parent {found} has unique id {parent.unique_id}, but this differencing "
                f"disk expects {expected} (the parent was changed or replaced)"
            )

    # -- mapping ----------------------------------------------------------------

    def _block(self, index: int) -> tuple[int | None, int]:
        """``(data_offset, sector bitmap as int)`` of block ``index``; None if unallocated."""
        entry = self._bat[index]
        if entry == UNALLOCATED:
            return None, 0
        cached = self._bitmaps.get(index)
        if cached is not None:
            return cached
        boff = entry * 512
        need = min(self._block_size, self._size - index * self._block_size)
        if boff + self._bitmap_size + need > self.file_size:
            raise self.fail(
                f"BAT entry for block {index} points to offset {boff}, past the end of the "
                f"file ({self.file_size} bytes)"
            )
        bitmap = msb_bitmap_to_int(self.pread(boff, self._bitmap_size))
        result = (boff + self._bitmap_size, bitmap)
        self._bitmaps.put(index, result)
        return result

    def _block_runs(
        self, index: int, start: int, end: int
    ) -> Iterable[tuple[int, int, int, int | None]]:
        """``(offset_in_block, length, kind, host)`` for bytes ``start..end`` of a block."""
        absent = BACKING if self._type == DIFFERENCING else ZERO
        data, bitmap = self._block(index)
        if data is None:
            yield start, end - start, absent, None
            return
        full = self._full_bitmap
        if bitmap & full == full:
            yield start, end - start, DATA, data + start
            return
        first = start // 512
        last = (end + 511) // 512
        for sec, count, bit in bit_runs(bitmap, first, last - first):
            a = max(start, sec * 512)
            b = min(end, (sec + count) * 512)
            if bit:
                yield a, b - a, DATA, data + a
            else:
                yield a, b - a, absent, None

    def _map(self, offset: int, length: int) -> Iterable[imgutil.Run]:
        if self._type == FIXED:
            yield DATA, length, offset
            return
        yield from self.map_by_blocks(offset, length, self._block_size, self._block_runs)

    def _segments(self) -> Iterable[imgutil.Segment]:
        if self._type == FIXED:
            yield 0, self._size, DATA, 0
            return
        bs = self._block_size
        # Blocks never overlap, so all allocated blocks fit in the file; a BAT
        # that says otherwise is corrupt (and would make this walk unbounded).
        mapped = 0
        for index in range(self._bat.count):
            base = index * bs
            stop = min(bs, self._size - base)
            if self._bat[index] != UNALLOCATED:
                mapped += stop + self._bitmap_size
                if mapped > self.file_size:
                    raise self.fail("BAT maps more block data than the file holds (blocks overlap)")
            for a, n, kind, host in self._block_runs(index, 0, stop):
                yield base + a, n, kind, host


def _windows_path(directory: str, name: str) -> str:
    r"""Map a Windows path from a locator to a local one.

    Relative paths (``.\parent.vhd``) resolve against the child's directory;
    absolute ones (``C:\VMs\parent.vhd``) cannot exist here, so their file name
    is looked up next to the child, where copied chains usually live.
    """
    name = name.replace("\\", "/")
    if name.startswith("//?/") or (len(name) > 1 and name[1] == ":") or name.startswith("//"):
        return os.path.join(directory, name.rsplit("/", 1)[-1])
    if name.startswith("/"):
        return name
    return os.path.normpath(os.path.join(directory, name))
