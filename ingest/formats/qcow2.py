"""qcow2 images (versions 2 and 3), read-only.

Supported: L1/L2 mapping, zero clusters, compressed clusters (zlib raw
deflate and zstd), extended L2 entries (32 subclusters per cluster), backing
chains of any format :func:`ingest.formats.detect.open_source` reads, external data
files, dirty (lazy refcount) images.  Refused with a one-line error:
encryption, the ``corrupt`` bit, unknown incompatible features.  Refcounts
and snapshots are never consulted: reading the active L1 table needs neither.
"""

from __future__ import annotations

import os
import struct
import zlib
from array import array
from collections.abc import Iterable, Iterator
from sys import byteorder
from typing import Any

import zstandard

from ingest.formats import imgutil
from ingest.formats.imgutil import (
    BACKING,
    BUF,
    DATA,
    ZERO,
    check_reference,
    file_size_of,
    is_sparse,
    open_backing,
    resolve_backing_name,
)
from ingest.formats.raw import open_readonly
from repofs.errors import SourceError

MAGIC = b"QFI\xfb"

INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_EXTL2 = 1 << 4
INCOMPAT_KNOWN = (
    INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2
)

EXT_END = 0x00000000
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_TABLE = 0x6803F857
EXT_BITMAPS = 0x23852875
EXT_CRYPTO = 0x0537BE77
EXT_DATA_FILE = 0x44415441

L1E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
L2E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
OFLAG_COPIED = 1 << 63
OFLAG_COMPRESSED = 1 << 62
OFLAG_ZERO = 1
ZERO_OR_COMPRESSED = OFLAG_ZERO | OFLAG_COMPRESSED
NOT_COPIED = ((1 << 64) - 1) ^ OFLAG_COPIED

RunAt = tuple[int, int, int, Any]

#: qemu's own limits: an L1 table of at most 32 MiB, virtual size below 2^55
#: (so no header field can make us allocate or loop beyond that).
MAX_L1_ENTRIES = 32 * 1024 * 1024 // 8
MAX_SIZE = 1 << 55
#: Memory the L2 cache may hold; tables are evicted least recently used.
L2_CACHE_BYTES = 32 * 1024 * 1024

#: qemu driver names that may appear as a backing format, mapped to ours.
BACKING_FORMATS = {"raw": "raw", "file": "raw", "host_device": "raw", "vpc": "vhd"}

COMPRESSION_NAMES = {0: "zlib", 1: "zstd"}


class Qcow2Source(imgutil.LayeredSource):
    """A qcow2 image and, through it, its backing chain."""

    format_name = "qcow2"

    def _parse(self) -> None:
        self._parse_header()
        self._open_backing()

    # -- header ---------------------------------------------------------------

    def _parse_header(self) -> None:
        if self.file_size < 72:
            raise self.fail(f"too small to be a qcow2 image ({self.file_size} bytes)")
        head = self.pread(0, min(self.file_size, 112))
        if head[:4] != MAGIC:
            raise self.fail("not a qcow2 image (bad magic)")
        (
            version,
            backing_off,
            backing_len,
            cluster_bits,
            size,
            crypt,
            l1_size,
            l1_off,
        ) = struct.unpack_from(">IQIIQIIQ", head, 4)
        if version not in (2, 3):
            raise self.fail(f"unsupported qcow2 version {version} (expected 2 or 3)")
        if not 9 <= cluster_bits <= 21:
            raise self.fail(f"invalid cluster_bits {cluster_bits} (must be 9..21)")
        cs = 1 << cluster_bits
        self._cluster_bits = cluster_bits
        self._cluster_size = cs
        if size > MAX_SIZE:
            raise self.fail(f"virtual size {size} is absurd (limit 2^55 bytes)")
        if crypt != 0:
            raise self.fail(
                f"is encrypted (crypt_method {crypt}); encrypted qcow2 images are not supported"
            )
        incompat = 0
        header_len = 72
        self._compression = 0
        if version == 3:
            if len(head) < 104:
                raise self.fail("version 3 header is truncated")
            incompat, _compat, _autoclear, refcount_order, header_len = struct.unpack_from(
                ">QQQII", head, 72
            )
            if header_len < 104 or header_len > cs or header_len > self.file_size:
                raise self.fail(f"invalid header_length {header_len}")
            if refcount_order > 6:
                raise self.fail(f"invalid refcount_order {refcount_order}")
            if header_len > 104:
                self._compression = head[104]
        unknown = incompat & ~INCOMPAT_KNOWN
        if unknown:
            raise self.fail(f"has unsupported incompatible feature bits {unknown:#x}")
        if incompat & INCOMPAT_CORRUPT:
            raise self.fail(
                "is marked corrupt by qemu; repair it with 'qemu-img check -r all' first"
            )
        if self._compression not in COMPRESSION_NAMES:
            raise self.fail(f"unknown compression type {self._compression}")
        if bool(self._compression) != bool(incompat & INCOMPAT_COMPRESSION):
            raise self.fail("compression type field and its incompatible feature bit disagree")
        self._extl2 = bool(incompat & INCOMPAT_EXTL2)
        if self._extl2 and cluster_bits < 14:
            raise self.fail("extended L2 entries need clusters of at least 16 KiB")
        self._entry_words = 2 if self._extl2 else 1
        self._l2_bits = cluster_bits - 3 - (1 if self._extl2 else 0)
        self._size = size

        # Header extensions live between the header and the backing file name
        # (or the end of the first cluster).
        ext_end = backing_off if backing_off else cs
        ext_end = min(ext_end, cs, self.file_size)
        self._backing_fmt: str | None = None
        data_file_name: str | None = None
        pos = header_len
        area = self.pread(0, ext_end) if ext_end > header_len else b""
        while pos + 8 <= ext_end:
            etype, elen = struct.unpack_from(">II", area, pos)
            pos += 8
            if etype == EXT_END:
                break
            if elen > ext_end - pos:
                raise self.fail(f"header extension {etype:#x} of {elen} bytes overruns the header")
            body = area[pos : pos + elen]
            if etype == EXT_BACKING_FORMAT:
                self._backing_fmt = body.split(b"\0", 1)[0].decode("ascii", "replace")
            elif etype == EXT_DATA_FILE:
                data_file_name = os.fsdecode(body.split(b"\0", 1)[0])
            elif etype == EXT_CRYPTO:
                raise self.fail("is encrypted (LUKS header extension); not supported")
            pos += (elen + 7) & ~7

        self._backing_name: str | None = None
        if backing_off:
            if backing_len > 1023 or backing_off + backing_len > cs:
                raise self.fail(f"backing file name of {backing_len} bytes is invalid")
            if backing_len:
                raw = self.pread(backing_off, backing_len)
                self._backing_name = os.fsdecode(raw)

        if incompat & INCOMPAT_DATA_FILE:
            if not data_file_name:
                raise self.fail("uses an external data file but does not name it")
            self._open_data_file(data_file_name)
        self._has_data_file = bool(incompat & INCOMPAT_DATA_FILE)

        # L1 table: large enough for the virtual size, inside the file.
        l2_span_bits = self._l2_bits + cluster_bits
        needed = (size + (1 << l2_span_bits) - 1) >> l2_span_bits
        if l1_size < needed:
            raise self.fail(f"L1 table has {l1_size} entries, {needed} needed for size {size}")
        if l1_size > MAX_L1_ENTRIES:
            raise self.fail(f"L1 table size {l1_size} is absurd")
        if l1_size and l1_off % cs:
            raise self.fail(f"L1 table offset {l1_off} is not cluster aligned")
        # Only the entries that cover the virtual size are ever consulted.
        self._l1 = imgutil.TableCache(self, "L1 table", l1_off, needed, 8, True)
        self._l2_cache = imgutil.LRU(max(16, L2_CACHE_BYTES // cs))
        self._zcache = imgutil.LRU(8)

    def _open_data_file(self, name: str) -> None:
        path = resolve_backing_name(self.path, name, "external data file")
        check_reference(self.path, name, path, "external data file")
        if not os.path.lexists(path):
            raise self.fail(f"external data file {path} does not exist")
        fd = open_readonly(path)
        try:
            self._data_size = file_size_of(fd)
            self._sparse = is_sparse(fd)
        except OSError as exc:
            os.close(fd)
            raise SourceError(f"{path}: cannot stat: {exc.strerror}") from None
        self._data_fd, self._data_path = fd, path

    def _open_backing(self) -> None:
        if self._backing_name is None:
            return
        fmt = None
        if self._backing_fmt:
            fmt = BACKING_FORMATS.get(self._backing_fmt, self._backing_fmt)
        path = resolve_backing_name(self.path, self._backing_name, "backing file")
        self._backing = open_backing(
            self.path, path, fmt, "backing file", name=self._backing_name
        )

    # -- tables ---------------------------------------------------------------

    def _l2_table(self, l1_index: int) -> array | None:
        entry = self._l1[l1_index]
        off = entry & L1E_OFFSET_MASK
        if off == 0:
            return None
        table = self._l2_cache.get(off)
        if table is not None:
            return table
        cs = self._cluster_size
        if off % cs:
            raise self.fail(f"L1 entry {l1_index} points to unaligned L2 table offset {off}")
        if off + cs > self.file_size:
            raise self.fail(
                f"L1 entry {l1_index} points to an L2 table at offset {off}, past the end "
                f"of the file ({self.file_size} bytes)"
            )
        table = array("Q", self.pread(off, cs))
        if byteorder == "little":
            table.byteswap()
        self._l2_cache.put(off, table)
        return table

    def _host_offset(self, entry: int, vcluster: int, used: int | None = None) -> int | None:
        """Host offset of a standard cluster, None when unallocated.

        ``used`` is how many bytes from the cluster start hold data (with
        subclusters qemu writes only the allocated ones, so an image may end
        in the middle of its last cluster).
        """
        off = entry & L2E_OFFSET_MASK
        if off == 0 and not (self._has_data_file and entry & OFLAG_COPIED):
            return None
        if off % self._cluster_size:
            raise self.fail(f"L2 entry for cluster {vcluster} has unaligned data offset {off}")
        need = min(
            self._cluster_size if used is None else used,
            self._size - (vcluster << self._cluster_bits),
        )
        if off + need > self._data_size:
            raise self.fail(
                f"L2 entry for cluster {vcluster} points to offset {off}, past the end of "
                f"{self._data_path} ({self._data_size} bytes)"
            )
        return off

    def _compressed(self, entry: int, vcluster: int) -> tuple[int, int]:
        if self._has_data_file:
            raise self.fail(f"cluster {vcluster} is compressed, invalid with an external data file")
        shift = 62 - (self._cluster_bits - 8)
        coff = entry & ((1 << shift) - 1)
        nsec = ((entry >> shift) & ((1 << (self._cluster_bits - 8)) - 1)) + 1
        csize = nsec * 512 - (coff & 511)
        if coff >= self.file_size:
            raise self.fail(
                f"compressed cluster {vcluster} points to offset {coff}, past the end of "
                f"the file ({self.file_size} bytes)"
            )
        return coff, min(csize, self.file_size - coff)

    def _decompress(self, entry: int, vcluster: int) -> bytes:
        coff, clen = self._compressed(entry, vcluster)
        cached = self._zcache.get(coff)
        if cached is not None:
            return cached
        data = self.pread(coff, clen)
        cs = self._cluster_size
        try:
            if self._compression == 0:
                out = zlib.decompressobj(-15).decompress(data, cs)
            else:
                out = _zstd_decompress(data, cs)
        except (zlib.error, zstandard.ZstdError) as exc:
            raise self.fail(
                f"compressed cluster {vcluster} at offset {coff} does not decompress "
                f"({COMPRESSION_NAMES[self._compression]}): {exc}"
            ) from None
        if len(out) != cs:
            raise self.fail(
                f"compressed cluster {vcluster} at offset {coff} decompresses to "
                f"{len(out)} bytes instead of {cs}"
            )
        self._zcache.put(coff, out)
        return out

    # -- mapping --------------------------------------------------------------

    def _classify(
        self, table: array, idx: int, vcluster: int
    ) -> Iterator[tuple[int, int, int, object]]:
        """Yield ``(start_in_cluster, length, kind, arg)`` for one cluster.

        For DATA ``arg`` is the host offset of ``start_in_cluster``; for a
        compressed cluster the kind is BUF and ``arg`` the L2 entry.
        """
        cs = self._cluster_size
        if not self._extl2:
            entry = table[idx]
            if entry & OFLAG_COMPRESSED:
                yield 0, cs, BUF, entry
            elif entry & OFLAG_ZERO:
                yield 0, cs, ZERO, None
            else:
                host = self._host_offset(entry, vcluster)
                if host is None:
                    yield 0, cs, BACKING, None
                else:
                    yield 0, cs, DATA, host
            return
        entry = table[2 * idx]
        bitmap = table[2 * idx + 1]
        if entry & OFLAG_COMPRESSED:
            yield 0, cs, BUF, entry
            return
        alloc = bitmap & 0xFFFFFFFF
        zero = bitmap >> 32
        host = self._host_offset(entry, vcluster, alloc.bit_length() * (cs >> 5))
        if host is None:
            if alloc:
                raise self.fail(
                    f"L2 entry for unallocated cluster {vcluster} has allocated subclusters"
                )
        elif alloc & zero:
            raise self.fail(
                f"L2 entry for cluster {vcluster} marks subclusters both allocated and zero"
            )
        if zero == 0 and (alloc == 0xFFFFFFFF or host is None):
            if host is None:
                yield 0, cs, BACKING, None
            else:
                yield 0, cs, DATA, host
            return
        if zero == 0xFFFFFFFF:
            yield 0, cs, ZERO, None
            return
        sc = cs >> 5
        for i in range(32):
            bit = 1 << i
            if zero & bit:
                yield i * sc, sc, ZERO, None
            elif alloc & bit:
                yield i * sc, sc, DATA, host + i * sc  # type: ignore[operator]
            else:
                yield i * sc, sc, BACKING, None

    def _runs(self, table: array, l1i: int, first: int, last: int) -> Iterator[RunAt]:
        """Yield ``(virtual_offset, length, kind, arg)`` for clusters ``first..last-1`` of a table.

        Neighbouring clusters of the same kind are merged here, in one tight
        loop over the table, so a 4 MiB read of a 4 KiB-cluster image costs a
        few runs rather than a thousand generator round trips.  ``arg`` is the
        host offset for DATA and the L2 entry for BUF (compressed, one
        cluster per run).
        """
        cb = self._cluster_bits
        cs = self._cluster_size
        vbase = l1i << (self._l2_bits + cb)
        first_cluster = l1i << self._l2_bits
        if self._extl2:
            for idx in range(first, last):
                cstart = vbase + (idx << cb)
                for start, n, kind, arg in self._classify(table, idx, first_cluster + idx):
                    yield cstart + start, n, kind, arg
            return
        idx = first
        while idx < last:
            entry = table[idx]
            vstart = vbase + (idx << cb)
            if entry & OFLAG_COMPRESSED:
                yield vstart, cs, BUF, entry
                idx += 1
                continue
            j = idx + 1
            if entry & OFLAG_ZERO:
                while j < last and table[j] & ZERO_OR_COMPRESSED == OFLAG_ZERO:
                    j += 1
                yield vstart, (j - idx) << cb, ZERO, None
            else:
                host = self._host_offset(entry, first_cluster + idx)
                if host is None:
                    while j < last and table[j] == 0:
                        j += 1
                    yield vstart, (j - idx) << cb, BACKING, None
                else:
                    expect = host + cs
                    while j < last and table[j] & NOT_COPIED == expect:
                        j += 1
                        expect += cs
                    need = min((j - idx) << cb, self._size - vstart)
                    if host + need > self._data_size:
                        raise self.fail(
                            f"L2 entries for clusters {first_cluster + idx}.."
                            f"{first_cluster + j - 1} point past the end of {self._data_path} "
                            f"({self._data_size} bytes)"
                        )
                    yield vstart, (j - idx) << cb, DATA, host
            idx = j

    def _map(self, offset: int, length: int) -> Iterable[imgutil.Run]:
        cb = self._cluster_bits
        l2_bits = self._l2_bits
        l2_mask = (1 << l2_bits) - 1
        pos, end = offset, offset + length
        while pos < end:
            l1i = pos >> (cb + l2_bits)
            span_end = min(end, (l1i + 1) << (cb + l2_bits))
            table = self._l2_table(l1i)
            if table is None:
                yield BACKING, span_end - pos, None
                pos = span_end
                continue
            first = (pos >> cb) & l2_mask
            last = (((span_end - 1) >> cb) & l2_mask) + 1
            for vstart, n, kind, arg in self._runs(table, l1i, first, last):
                a = max(pos, vstart)
                b = min(span_end, vstart + n)
                if a >= b:
                    continue
                if kind == DATA:
                    yield DATA, b - a, arg + (a - vstart)
                elif kind == BUF:
                    data = self._decompress(arg, vstart >> cb)
                    yield BUF, b - a, memoryview(data)[a - vstart : b - vstart]
                else:
                    yield kind, b - a, None
            pos = span_end

    def _segments(self) -> Iterable[imgutil.Segment]:
        cb = self._cluster_bits
        l2_bits = self._l2_bits
        span = 1 << (cb + l2_bits)
        entries_per = 1 << l2_bits
        # A valid image never lists one L2 table twice in its active L1 table;
        # refusing that keeps this walk bounded by the file size.
        seen: set[int] = set()
        for l1i in range(self._l1.count):
            base = l1i * span
            table = self._l2_table(l1i)
            if table is None:
                yield base, span, BACKING, None
                continue
            l2_off = self._l1[l1i] & L1E_OFFSET_MASK
            if l2_off in seen:
                raise self.fail(
                    f"L2 table at offset {l2_off} is referenced by more than one L1 entry "
                    f"(corrupt image)"
                )
            seen.add(l2_off)
            nclusters = min(entries_per, (self._size - base + (1 << cb) - 1) >> cb)
            for vstart, n, kind, arg in self._runs(table, l1i, 0, nclusters):
                if kind == BUF:
                    self._compressed(arg, vstart >> cb)
                    yield vstart, n, DATA, None
                else:
                    yield vstart, n, kind, arg


def _zstd_decompress(data: bytes, limit: int) -> bytes:
    """Decompress one zstd frame to at most ``limit`` bytes (trailing padding ignored).

    The window is capped so a hostile frame cannot make zstd allocate more
    than a few MiB.
    """
    dctx = zstandard.ZstdDecompressor(max_window_size=1 << 23)
    parts: list[bytes] = []
    got = 0
    with dctx.stream_reader(data) as reader:
        while got < limit:
            chunk = reader.read(limit - got)
            if not chunk:
                break
            parts.append(chunk)
            got += len(chunk)
    return b"".join(parts)
