"""Microsoft VHDX images (MS-VHDX): fixed, dynamic and differencing, read-only.

Structures used: the two headers (the valid one with the higher sequence
number wins, CRC32C-checked), the region table (BAT and metadata regions),
the metadata items (file parameters, virtual disk size, logical sector size,
parent locator) and the BAT with its payload and sector bitmap entries.

A file whose header names a log that still holds valid entries was not
closed cleanly; replaying it means writing, which an ingest must not do, so
such a file is refused (qemu refuses it read-only too).
"""

from __future__ import annotations

import os
import re
import struct
import uuid
from collections.abc import Iterable

from ingest.formats import imgutil
from ingest.formats.imgutil import BACKING, DATA, ZERO, bit_runs

KiB, MiB = 1024, 1024 * 1024

SIGNATURE = b"vhdxfile"
HEADER_OFFSETS = (64 * KiB, 128 * KiB)
REGION_OFFSETS = (192 * KiB, 256 * KiB)
REGION_SIZE = 64 * KiB

BAT_GUID = uuid.UUID("2DC27766-F623-4200-9D64-115E9BFD4A08")
METADATA_GUID = uuid.UUID("8B7CA206-4790-4B9A-B8FE-575F050F886E")
FILE_PARAMS = uuid.UUID("CAA16737-FA36-4D43-B3B6-33F0AA44E76B")
DISK_SIZE = uuid.UUID("2FA54224-CD1B-4876-B211-5DBED83BF4B8")
DISK_ID = uuid.UUID("BECA12AB-B2E6-4523-93EF-C309E000C746")
LOGICAL_SECTOR = uuid.UUID("8141BF1D-A96F-4709-BA47-F233A8FAAB5F")
PHYSICAL_SECTOR = uuid.UUID("CDA348C7-445D-4471-9CC9-E9885251C556")
PARENT_LOCATOR = uuid.UUID("A8D35F2D-B30B-454D-ABF7-D3D84834AB0C")
VHDX_LOCATOR_TYPE = uuid.UUID("B04AEFB7-D19E-4A81-B789-25B8E9445913")
KNOWN_METADATA = {FILE_PARAMS, DISK_SIZE, DISK_ID, LOGICAL_SECTOR, PHYSICAL_SECTOR, PARENT_LOCATOR}

NOT_PRESENT, UNDEFINED, BLOCK_ZERO, UNMAPPED = 0, 1, 2, 3
UNMAPPED_V095 = 5  # state used by drafts of the spec; qemu treats it as UNMAPPED
FULLY_PRESENT, PARTIALLY_PRESENT = 6, 7
SB_PRESENT = 6

MAX_DISK_SIZE = 64 * 1024**4  # the spec's limit: 64 TiB
MAX_LOG_ENTRY = 4 * MiB


def _crc32c_table() -> list[int]:
    table = []
    for i in range(256):
        crc = i
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return table


_CRC_TABLE = _crc32c_table()


def _zero_operator_apply(matrix: list[int], reg: int) -> int:
    """Multiply the 32x32 GF(2) matrix (given as columns) by the register."""
    out = 0
    i = 0
    while reg:
        if reg & 1:
            out ^= matrix[i]
        reg >>= 1
        i += 1
    return out


def _zero_operators() -> list[list[int]]:
    """Matrices that advance the CRC register over 2**k zero bytes, k = 0..39."""
    one = []
    for i in range(32):
        reg = 1 << i
        one.append(_CRC_TABLE[reg & 0xFF] ^ (reg >> 8))
    ops = [one]
    for _ in range(39):
        m = ops[-1]
        ops.append([_zero_operator_apply(m, col) for col in m])
    return ops


_ZERO_OPS: list[list[int]] = []
_ZERO_RUN = re.compile(rb"\x00{256,}")


def _crc_bytes(reg: int, data: bytes | memoryview) -> int:
    table = _CRC_TABLE
    for byte in data:
        reg = table[(reg ^ byte) & 0xFF] ^ (reg >> 8)
    return reg


def crc32c(data: bytes, crc: int = 0) -> int:
    """CRC-32C (Castagnoli), as VHDX uses for headers, region tables and log entries.

    Table driven and pure Python, to avoid a new dependency.  The structures
    it covers (4 KiB headers, 64 KiB region tables) are mostly zeros, so long
    zero runs are skipped with precomputed GF(2) "append 2**k zero bytes"
    operators (the technique of zlib's crc32_combine) instead of a loop per
    byte.
    """
    if not _ZERO_OPS:
        _ZERO_OPS.extend(_zero_operators())
    reg = crc ^ 0xFFFFFFFF
    view = memoryview(data)
    pos = 0
    for match in _ZERO_RUN.finditer(data):
        start, end = match.span()
        reg = _crc_bytes(reg, view[pos:start])
        n, k = end - start, 0
        while n:
            if n & 1:
                reg = _zero_operator_apply(_ZERO_OPS[k], reg)
            n >>= 1
            k += 1
        pos = end
    reg = _crc_bytes(reg, view[pos:])
    return reg ^ 0xFFFFFFFF


def _checked(buf: bytes, field: int) -> bool:
    """Whether ``buf`` carries a valid CRC32C in the 4 bytes at ``field``."""
    (stored,) = struct.unpack_from("<I", buf, field)
    return crc32c(buf[:field] + b"\0\0\0\0" + buf[field + 4 :]) == stored


def is_valid_header(buf: bytes) -> bool:
    """Whether ``buf`` (4 KiB at 64 or 128 KiB) is a VHDX header with a valid CRC32C."""
    return len(buf) >= 4 * KiB and buf[:4] == b"head" and _checked(buf[: 4 * KiB], 4)


class VhdxSource(imgutil.LayeredSource):
    """A VHDX image; a differencing disk reads through its parent."""

    # -- structures -----------------------------------------------------------

    def _parse(self) -> None:
        if self.file_size < 1 * MiB:
            raise self.fail(f"too small to be a VHDX image ({self.file_size} bytes)")
        if self.pread(0, 8) != SIGNATURE:
            raise self.fail("not a VHDX image (no 'vhdxfile' signature)")
        header = self._pick_header()
        self.data_write_guid = uuid.UUID(bytes_le=header[32:48])
        self._check_log(header)
        regions = self._region_table()
        if BAT_GUID not in regions or METADATA_GUID not in regions:
            raise self.fail("region table lacks the BAT or the metadata region")
        self._parse_metadata(*regions[METADATA_GUID])
        self._setup_bat(*regions[BAT_GUID])
        kind = "differencing" if self._has_parent else "fixed" if self._fixed else "dynamic"
        self.format_name = f"vhdx:{kind}"
        if self._has_parent:
            self._open_parent()

    def _pick_header(self) -> bytes:
        best: tuple[int, bytes] | None = None
        for off in HEADER_OFFSETS:
            buf = self.pread(off, 4 * KiB)
            if not is_valid_header(buf):
                continue
            (seq,) = struct.unpack_from("<Q", buf, 8)
            (version,) = struct.unpack_from("<H", buf, 66)
            if version != 1:
                raise self.fail(f"unsupported VHDX version {version}")
            if best is None or seq > best[0]:
                best = (seq, buf)
        if best is None:
            raise self.fail("neither VHDX header is valid (bad signature or CRC32C)")
        return best[1]

    def _check_log(self, header: bytes) -> None:
        """Refuse a file whose log holds entries that would need replaying."""
        log_guid = header[48:64]
        if log_guid == bytes(16):
            return
        log_len, log_off = struct.unpack_from("<IQ", header, 68)
        if log_off % MiB or log_len % MiB or log_off + log_len > self.file_size:
            raise self.fail(f"log region ({log_len} bytes at {log_off}) is invalid")
        for pos in range(0, log_len, 4 * KiB):
            head = self.pread(log_off + pos, 64)
            if head[:4] != b"loge":
                continue
            (entry_len,) = struct.unpack_from("<I", head, 8)
            if entry_len < 4 * KiB or entry_len % (4 * KiB) or pos + entry_len > log_len:
                continue
            if head[32:48] != log_guid:
                continue
            # Real entries are a few KiB to a few MiB; a larger one is not
            # checksummed (that could take minutes) but refused as if valid.
            if entry_len > MAX_LOG_ENTRY or _checked(self.pread(log_off + pos, entry_len), 4):
                raise self.fail(
                    "has a VHDX log that needs replaying (not closed cleanly); open it once "
                    "with Hyper-V or 'qemu-img check -r all' to replay it"
                )

    def _region_table(self) -> dict[uuid.UUID, tuple[int, int]]:
        for off in REGION_OFFSETS:
            buf = self.pread(off, REGION_SIZE)
            if buf[:4] != b"regi" or not _checked(buf, 4):
                continue
            (count,) = struct.unpack_from("<I", buf, 8)
            if count > 2047:
                raise self.fail(f"region table has {count} entries (limit 2047)")
            regions: dict[uuid.UUID, tuple[int, int]] = {}
            for i in range(count):
                guid = uuid.UUID(bytes_le=buf[16 + 32 * i : 32 + 32 * i])
                roff, rlen, required = struct.unpack_from("<QII", buf, 32 + 32 * i)
                if guid not in (BAT_GUID, METADATA_GUID):
                    if required & 1:
                        raise self.fail(f"requires unknown region {guid}")
                    continue
                if roff % MiB or roff < MiB or roff + rlen > self.file_size:
                    raise self.fail(
                        f"region {guid} ({rlen} bytes at {roff}) is misaligned or past the "
                        f"end of the file"
                    )
                regions[guid] = (roff, rlen)
            return regions
        raise self.fail("neither VHDX region table is valid (bad signature or CRC32C)")

    def _parse_metadata(self, moff: int, mlen: int) -> None:
        if mlen < 64 * KiB:
            raise self.fail(f"metadata region of {mlen} bytes is too small")
        table = self.pread(moff, 64 * KiB)
        if table[:8] != b"metadata":
            raise self.fail("metadata table has a bad signature")
        (count,) = struct.unpack_from("<H", table, 10)
        if count > 2047:
            raise self.fail(f"metadata table has {count} entries (limit 2047)")
        items: dict[uuid.UUID, bytes] = {}
        for i in range(count):
            base = 32 + 32 * i
            guid = uuid.UUID(bytes_le=table[base : base + 16])
            ioff, ilen, flags = struct.unpack_from("<III", table, base + 16)
            if guid not in KNOWN_METADATA:
                if flags & 4:
                    raise self.fail(f"requires unknown metadata item {guid}")
                continue
            if guid in items:
                raise self.fail(f"metadata item {guid} appears twice")
            if ilen > MiB or (ilen and (ioff < 64 * KiB or ioff + ilen > mlen)):
                raise self.fail(f"metadata item {guid} lies outside the metadata region")
            items[guid] = self.pread(moff + ioff, ilen)

        def item(guid: uuid.UUID, size: int, what: str) -> bytes:
            data = items.get(guid)
            if data is None or len(data) < size:
                raise self.fail(f"metadata item '{what}' is missing")
            return data

        block_size, bits = struct.unpack_from("<II", item(FILE_PARAMS, 8, "file parameters"))
        (disk_size,) = struct.unpack_from("<Q", item(DISK_SIZE, 8, "virtual disk size"))
        (lss,) = struct.unpack_from("<I", item(LOGICAL_SECTOR, 4, "logical sector size"))
        if block_size < MiB or block_size > 256 * MiB or block_size & (block_size - 1):
            raise self.fail(f"absurd block size {block_size} (must be a power of 2, 1-256 MiB)")
        if lss not in (512, 4096):
            raise self.fail(f"logical sector size {lss} is invalid (512 or 4096)")
        if disk_size > MAX_DISK_SIZE or disk_size % lss:
            raise self.fail(f"virtual disk size {disk_size} is invalid")
        self._block_size = block_size
        self._lss = lss
        self._size = disk_size
        self._fixed = bool(bits & 1)
        self._has_parent = bool(bits & 2)
        self._locator = items.get(PARENT_LOCATOR)
        if self._has_parent and self._locator is None:
            raise self.fail("differencing VHDX has no parent locator")

    def _setup_bat(self, boff: int, blen: int) -> None:
        bs = self._block_size
        self._chunk_ratio = (1 << 23) * self._lss // bs
        blocks = (self._size + bs - 1) // bs
        cr = self._chunk_ratio
        if self._has_parent:
            entries = (blocks + cr - 1) // cr * (cr + 1)
        else:
            entries = blocks + (blocks - 1) // cr if blocks else 0
        if entries * 8 > blen:
            raise self.fail(f"BAT region of {blen} bytes cannot hold {entries} entries")
        self._nblocks = blocks
        self._bat = imgutil.TableCache(self, "BAT", boff, entries, 8, False)
        self._bitmaps = imgutil.LRU(256)
        self._bits_per_block = bs // self._lss

    # -- parent ---------------------------------------------------------------

    def _parent_locator(self) -> dict[str, str]:
        loc = self._locator or b""
        if len(loc) < 20:
            raise self.fail("parent locator is truncated")
        if uuid.UUID(bytes_le=loc[:16]) != VHDX_LOCATOR_TYPE:
            raise self.fail("parent locator is not of the VHDX type")
        (count,) = struct.unpack_from("<H", loc, 18)
        if 20 + 12 * count > len(loc):
            raise self.fail(f"parent locator with {count} entries is truncated")
        entries: dict[str, str] = {}
        for i in range(count):
            koff, voff, klen, vlen = struct.unpack_from("<IIHH", loc, 20 + 12 * i)
            if koff + klen > len(loc) or voff + vlen > len(loc):
                raise self.fail(f"parent locator entry {i} lies outside the locator")
            key = loc[koff : koff + klen].decode("utf-16-le", "replace")
            entries[key] = loc[voff : voff + vlen].decode("utf-16-le", "replace")
        return entries

    def _open_parent(self) -> None:
        from ingest.formats.vhd import _windows_path

        entries = self._parent_locator()
        linkage = entries.get("parent_linkage")
        if not linkage:
            raise self.fail("parent locator has no parent_linkage")
        accepted = set()
        for key in ("parent_linkage", "parent_linkage2"):
            if key in entries:
                try:
                    accepted.add(uuid.UUID(entries[key]))
                except ValueError:
                    raise self.fail(
                        f"parent locator {key} {entries[key]!r} is not a GUID"
                    ) from None
        here = os.path.dirname(self.path)
        candidates: dict[str, str] = {}
        for key in ("relative_path", "absolute_win32_path", "volume_path"):
            if entries.get(key):
                candidates.setdefault(_windows_path(here, entries[key]), entries[key])
        if not candidates:
            raise self.fail("parent locator names no parent path")
        found, parent = self._open_parent_of(candidates, VhdxSource, "VHDX")
        if parent.data_write_guid not in accepted:
            raise self.fail(
                f"parent {found} has data write GUID {parent.data_write_guid}, but this "
                f"differencing disk expects {linkage} (the parent was changed or replaced)"
            )

    # -- mapping ----------------------------------------------------------------

    def _sector_bitmap(self, block: int) -> int:
        """This block's bits of its chunk's sector bitmap (bit i = logical sector i)."""
        cached = self._bitmaps.get(block)
        if cached is not None:
            return cached
        cr = self._chunk_ratio
        chunk = block // cr
        entry = self._bat[chunk * (cr + 1) + cr]
        if entry & 7 != SB_PRESENT:
            raise self.fail(
                f"block {block} is partially present but its sector bitmap block is missing"
            )
        soff = (entry >> 20) * MiB
        if soff + MiB > self.file_size:
            raise self.fail(
                f"sector bitmap block for chunk {chunk} points to offset {soff}, past the "
                f"end of the file"
            )
        nbytes = self._bits_per_block // 8
        raw = self.pread(soff + (block % cr) * nbytes, nbytes)
        bits = int.from_bytes(raw, "little")
        self._bitmaps.put(block, bits)
        return bits

    def _block_host(self, block: int, entry: int) -> int:
        """Where a present block's data starts in the file, checked to lie inside it."""
        host = (entry >> 20) * MiB
        need = min(self._block_size, self._size - block * self._block_size)
        if host < MiB or host + need > self.file_size:
            raise self.fail(
                f"BAT entry for block {block} points to offset {host}, outside the file "
                f"({self.file_size} bytes)"
            )
        return host

    def _block_runs(
        self, block: int, start: int, end: int
    ) -> Iterable[tuple[int, int, int, int | None]]:
        """``(offset_in_block, length, kind, host)`` for bytes ``start..end`` of a block."""
        entry = self._bat[block + block // self._chunk_ratio]
        state = entry & 7
        if state == FULLY_PRESENT:
            host = self._block_host(block, entry)
            yield start, end - start, DATA, host + start
        elif state == NOT_PRESENT:
            yield start, end - start, BACKING if self._has_parent else ZERO, None
        elif state in (BLOCK_ZERO, UNDEFINED, UNMAPPED, UNMAPPED_V095):
            yield start, end - start, ZERO, None
        elif state == PARTIALLY_PRESENT:
            if not self._has_parent:
                raise self.fail(f"block {block} is partially present in a non-differencing VHDX")
            host = self._block_host(block, entry)
            bits = self._sector_bitmap(block)
            lss = self._lss
            first, last = start // lss, (end + lss - 1) // lss
            for sec, count, bit in bit_runs(bits, first, last - first):
                a, b = max(start, sec * lss), min(end, (sec + count) * lss)
                if bit:
                    yield a, b - a, DATA, host + a
                else:
                    yield a, b - a, BACKING, None
        else:
            raise self.fail(f"BAT entry for block {block} has reserved state {state}")

    def _map(self, offset: int, length: int) -> Iterable[imgutil.Run]:
        return self.map_by_blocks(offset, length, self._block_size, self._block_runs)

    def _segments(self) -> Iterable[imgutil.Segment]:
        bs = self._block_size
        # Payload blocks never overlap, so together they fit in the file; a BAT
        # that says otherwise is corrupt (and would make this walk unbounded).
        mapped = 0
        for block in range(self._nblocks):
            base = block * bs
            stop = min(bs, self._size - base)
            if self._bat[block + block // self._chunk_ratio] & 7 in (
                FULLY_PRESENT,
                PARTIALLY_PRESENT,
            ):
                mapped += stop
                if mapped > self.file_size:
                    raise self.fail(
                        "BAT maps more payload data than the file holds (blocks overlap)"
                    )
            for a, n, kind, host in self._block_runs(block, 0, stop):
                yield base + a, n, kind, host
