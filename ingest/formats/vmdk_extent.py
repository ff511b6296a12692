"""Building blocks shared by the VMDK extent readers.

An extent maps a range of its virtual bytes to *pieces*: runs that are
unallocated (fall through to the parent disk), explicitly zero, plain data at
a file offset, or one deflate-compressed grain.  The image and chain layers
in :mod:`ingest.formats.vmdk` only ever see pieces, so flat, hosted-sparse, COWD and
SEsparse extents all read through one code path that coalesces neighbouring
data into single ``preadv`` calls.
"""

from __future__ import annotations

import array
import errno
import itertools
import os
import stat
import sys
from collections.abc import Callable, Iterator

from ingest.formats.imgutil import LRU, pread_into
from ingest.formats.raw import open_readonly
from ingest.formats.source import pread_exact
from ingest.formats.vmdk_descriptor import show
from repofs.errors import SourceError

#: Piece kinds.
UNALLOC = 0  # not in this layer: read the parent, or zeros without one
ZERO = 1  # explicitly zero in this layer (masks the parent)
DATA = 2  # plain bytes at a file offset
DEFLATE = 3  # one compressed grain; file offset of its marker/stream

#: ``(length, kind, file_offset, grain_start)``: ``grain_start`` is the
#: extent-relative offset of the grain a DEFLATE piece lies in, else 0.
Piece = tuple[int, int, int, int]

SECTOR = 512
#: Grains larger than this are a damaged header (VMware uses 64 KiB; qemu
#: tolerates more, but nothing writes it).
MAX_GRAIN_BYTES = 2 << 20

_LITTLE = sys.byteorder == "little"


def is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def le_array(typecode: str, data: bytes) -> array.array[int]:
    """Little-endian table bytes as an array of unsigned ints."""
    arr = array.array(typecode)
    arr.frombytes(data)
    if not _LITTLE:
        arr.byteswap()
    return arr


class FilePool:
    """Opens extent files on demand and keeps at most ``limit`` descriptors open.

    A twoGbMaxExtent disk of 2 TiB has a thousand extent files, more than
    the usual open-file limit; ingest reads them in order, so an LRU of a few
    dozen open files costs nothing.  Reopened files are checked to be the same
    inode, so a file swapped underneath the reader is an error, not new data.
    """

    def __init__(self, limit: int = 64) -> None:
        self._open = LRU(limit, evicted=os.close)  # ExtentFile -> open descriptor

    def fd(self, f: ExtentFile) -> int:
        fd: int | None = self._open.get(f)
        if fd is not None:
            return fd
        fd = open_readonly(f.os_path)
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) != f.identity:
            os.close(fd)
            raise SourceError(f"{f.path}: file was replaced while it was being read")
        self.adopt(f, fd)
        return fd

    def adopt(self, f: ExtentFile, fd: int) -> None:
        self._open.put(f, fd)

    def close(self) -> None:
        self._open.clear()


class ExtentFile:
    """One file read by a VMDK (descriptor, extent or parent) with bounds-checked reads."""

    def __init__(self, path: str, pool: FilePool, fd: int | None = None) -> None:
        #: Name for messages (printable); ``os_path`` is what is opened.
        self.path = show(path, None)
        self.os_path = path
        self._pool = pool
        if fd is None:
            fd = open_readonly(path)
        # From here on the descriptor is ours (a passed-in one is taken over).
        try:
            st = os.fstat(fd)
            if stat.S_ISBLK(st.st_mode):
                self.size = os.lseek(fd, 0, os.SEEK_END)
                self.is_block = True
            elif stat.S_ISREG(st.st_mode):
                self.size = st.st_size
                self.is_block = False
            else:
                raise SourceError(f"{self.path}: not a regular file or block device")
        except BaseException:
            os.close(fd)
            raise
        self.identity = (st.st_dev, st.st_ino)
        pool.adopt(self, fd)

    def __hash__(self) -> int:
        return id(self)

    @property
    def fd(self) -> int:
        return self._pool.fd(self)

    def check_range(self, offset: int, length: int, what: str) -> None:
        """Raise unless ``[offset, offset+length)`` lies inside the file."""
        if offset < 0 or offset + length > self.size:
            raise SourceError(
                f"{self.path}: {what} at byte {offset} (+{length}) lies past the end of "
                f"the file ({self.size} bytes); the file is truncated or damaged"
            )

    def pread(self, length: int, offset: int, what: str = "data") -> bytes:
        self.check_range(offset, length, what)
        return pread_exact(self.fd, length, offset, self.path)

    def preadinto(self, buf: memoryview, offset: int) -> None:
        """Fill ``buf`` from ``offset`` without an intermediate copy."""
        self.check_range(offset, len(buf), "data")
        pread_into(self.fd, buf, offset, self.path)

    def data_ranges(self, offset: int, length: int) -> Iterator[tuple[int, int]]:
        """Yield the ``(offset, length)`` parts of a file range that are not holes."""
        end = offset + length
        if self.is_block:
            yield offset, length
            return
        pos = offset
        while pos < end:
            # The descriptor afresh for each step: this generator yields, and an LRU eviction
            # meanwhile could close it and hand its number to another extent file.
            fd = self.fd
            try:
                data = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:  # only a hole remains
                    return
                yield pos, end - pos  # the filesystem cannot tell: say data
                return
            if data >= end:
                return
            hole = min(os.lseek(fd, data, os.SEEK_HOLE), end)
            if hole <= data:  # defensive: never loop without progress
                yield data, end - data
                return
            yield data, hole - data
            pos = hole


class Extent:
    """A contiguous run of the virtual disk backed by one file (or by nothing)."""

    #: Virtual size in bytes.
    size: int
    file: ExtentFile | None = None

    def map(self, offset: int, length: int, for_alloc: bool = False) -> Iterator[Piece]:
        """Describe ``[offset, offset+length)`` (extent-relative) as pieces, in order."""
        raise NotImplementedError

    def inflate(self, grains: list[tuple[int, int]]) -> dict[tuple[int, int], bytes]:
        """Decompress DEFLATE grains given as ``(file_offset, grain_start)``, keyed alike."""
        raise SourceError(f"{self.describe()}: extent has no compressed grains")

    def describe(self) -> str:
        return self.file.path if self.file else "ZERO extent"


class ZeroExtent(Extent):
    """A ``ZERO`` extent: reads as zeros, stores nothing."""

    def __init__(self, size: int) -> None:
        self.size = size

    def map(self, offset: int, length: int, for_alloc: bool = False) -> Iterator[Piece]:
        yield length, ZERO, 0, 0


class FlatExtent(Extent):
    """A ``FLAT``/``VMFS`` extent: the virtual bytes are a range of a plain file."""

    def __init__(self, file: ExtentFile, size: int, start: int) -> None:
        self.file = file
        self.size = size
        self.start = start
        file.check_range(start, size, "flat extent data")

    def map(self, offset: int, length: int, for_alloc: bool = False) -> Iterator[Piece]:
        assert self.file is not None
        base = self.start + offset
        if not for_alloc:
            yield length, DATA, base, 0
            return
        pos = base
        for start, n in self.file.data_ranges(base, length):
            if start > pos:
                yield start - pos, ZERO, 0, 0
            yield n, DATA, start, 0
            pos = start + n
        if pos < base + length:
            yield base + length - pos, ZERO, 0, 0


class TableCache:
    """A bounded LRU of decoded grain tables shared by every extent of a source.

    Bounded by table entries, not tables, because a hosted-sparse table has
    512 entries and a COWD or SEsparse one 4096.
    """

    def __init__(self, max_entries: int = 1 << 20) -> None:
        self._tables = LRU(max_entries, weight=len)  # (extent, table number) -> table

    def get(self, key: tuple[int, int]) -> array.array[int] | None:
        table: array.array[int] | None = self._tables.get(key)
        return table

    def put(self, key: tuple[int, int], table: array.array[int]) -> None:
        self._tables.put(key, table)


_serial = itertools.count()


class GrainTableExtent(Extent):
    """An extent addressed through a grain directory and grain tables.

    Subclasses load one grain table as an array where 0 means unallocated,
    1 means an explicitly zero grain and any other value times :attr:`unit`
    is the byte offset of the grain in the file (already bounds-checked).
    Sector-addressed tables keep their on-disk values (``unit`` 512) so that
    validating a table is a few C-level ``set``/``min``/``max`` calls rather
    than a Python loop over every entry: with 512-byte COWD grains a 4 KiB
    table covers only 2 MiB.
    """

    compressed = False
    file: ExtentFile
    #: Bytes per table unit: 512 for sector pointers, 1 for byte offsets.
    unit = SECTOR

    def __init__(
        self, file: ExtentFile, size: int, grain: int, gt_entries: int, cache: TableCache
    ) -> None:
        self.file = file
        self.size = size
        self.grain = grain
        self.gt_entries = gt_entries
        self.coverage = grain * gt_entries
        self.n_tables = -(-size // self.coverage)
        self._cache = cache
        self._key = next(_serial)

    def load_table(self, index: int) -> array.array[int] | None:
        """Read and decode grain table ``index``; ``None`` when it is not allocated."""
        raise NotImplementedError

    def table(self, index: int) -> array.array[int] | None:
        key = (self._key, index)
        table = self._cache.get(key)
        if table is None:
            table = self.load_table(index)
            if table is None:
                return None
            self._cache.put(key, table)
        return table

    def grain_need(self, grain_start: int) -> int:
        """Bytes of the grain starting at ``grain_start`` that lie inside the extent."""
        return min(self.grain, self.size - grain_start)

    def entries_in_extent(self, index: int) -> int:
        """How many entries of table ``index`` describe grains inside the extent."""
        return min(self.gt_entries, -(-(self.size - index * self.coverage) // self.grain))

    def check_sector_table(
        self, index: int, entries: array.array[int], floor: int, zero_ok: bool | None
    ) -> None:
        """Validate a table of sector pointers (trimmed to :meth:`entries_in_extent`).

        Every data pointer must lie at or after byte ``floor`` and its grain
        (or, compressed, its 12-byte marker) must end inside the file.  An
        entry of 1 is a zeroed grain when ``zero_ok``, a damaged entry when
        ``False`` (the format has zeroed grains but this file did not enable
        them) and an ordinary pointer when ``None``.  The common all-good case
        costs a set, a min and a max; only a failing table is walked entry by
        entry to name the bad entry.
        """
        path = self.file.path
        values = set(entries)
        values.discard(0)
        if 1 in values and zero_ok is not None:
            if zero_ok:
                values.discard(1)
            else:
                raise SourceError(
                    f"{path}: grain table {index} entry {entries.index(1)} is 1 (zeroed "
                    "grain) but the header does not enable zeroed grains"
                )
        if not values:
            return
        lo, hi = min(values), max(values)
        need = 12 if self.compressed else self.grain
        if lo * SECTOR >= floor and hi * SECTOR + need <= self.file.size:
            return
        t_start = index * self.coverage
        for i, e in enumerate(entries):
            if e == 0 or (e == 1 and zero_ok):
                continue
            need = 12 if self.compressed else self.grain_need(t_start + i * self.grain)
            if e * SECTOR + need > self.file.size:
                raise SourceError(
                    f"{path}: grain table {index} entry {i} points to sector {e}, past the end "
                    f"of the file ({self.file.size} bytes)"
                )
            if e * SECTOR < floor:
                raise SourceError(
                    f"{path}: grain table {index} entry {i} points to sector {e}, inside the "
                    "file's header"
                )

    @staticmethod
    def _gallop(limit: int, start: int, ok: Callable[[int, int], bool]) -> int:
        """Largest ``j <= limit`` such that ``ok(start, j)``; ``ok`` tests a slice.

        Doubling then bisecting keeps long runs to a handful of C-level
        slice comparisons.
        """
        good, width = start, 1
        while good < limit:
            probe = min(limit, good + width)
            if ok(good, probe):
                good, width = probe, width * 2
                continue
            bad = probe
            while bad - good > 1:
                mid = (good + bad) // 2
                if ok(good, mid):
                    good = mid
                else:
                    bad = mid
            break
        return good

    def _run_end(self, table: array.array[int], i: int, limit: int, contiguous: bool) -> int:
        """End of the run of entries like ``table[i]`` within ``[i, limit)``.

        A run is a constant 0 or 1, or data grains: laid out back to back in
        the file when ``contiguous`` (each entry one grain above the last),
        or merely allocated otherwise (all that allocation maps need).
        """
        first = table[i]
        j = i + 1
        if j >= limit:
            return j
        tc = table.typecode
        step = self.grain // self.unit
        nxt = table[j]
        if first <= 1:
            if nxt != first:
                return j
            const = array.array(tc, [first])

            def ok(a: int, b: int) -> bool:
                return table[a:b] == const * (b - a)

        elif not contiguous:
            if nxt <= 1:
                return j

            def ok(a: int, b: int) -> bool:
                return min(table[a:b]) > 1

        else:
            if nxt != first + step:
                return j
            top = 0xFFFFFFFF if tc == "I" else 0xFFFFFFFFFFFFFFFF

            def ok(a: int, b: int) -> bool:
                v = first + (a - i) * step
                if v + (b - a - 1) * step > top:
                    return False
                return table[a:b] == array.array(tc, range(v, v + (b - a) * step, step))

        return self._gallop(limit, j + 1, ok)

    def map(self, offset: int, length: int, for_alloc: bool = False) -> Iterator[Piece]:
        grain = self.grain
        unit = self.unit
        end = offset + length
        pos = offset
        kind = -1
        run_len = run_off = run_gstart = 0
        while pos < end:
            ti = pos // self.coverage
            t_start = ti * self.coverage
            stop = min(end, t_start + self.coverage)
            table = self.table(ti)
            if table is None:
                k, n, foff, gstart = UNALLOC, stop - pos, 0, 0
                if k == kind:
                    run_len += n
                else:
                    if run_len:
                        yield run_len, kind, run_off, run_gstart
                    kind, run_len, run_off, run_gstart = k, n, foff, gstart
                pos = stop
                continue
            last = (stop - 1 - t_start) // grain + 1
            while pos < stop:
                gi = (pos - t_start) // grain
                g_start = t_start + gi * grain
                e = table[gi]
                if e == 0 or e == 1:
                    gj = self._run_end(table, gi, last, False)
                    k, foff, gstart = (UNALLOC if e == 0 else ZERO), 0, 0
                elif for_alloc:
                    # Only "allocated or not" matters: one piece per allocated run.
                    gj = self._run_end(table, gi, last, False)
                    k, foff, gstart = DATA, -1, 0
                elif self.compressed:
                    gj = gi + 1
                    k, foff, gstart = DEFLATE, e * unit, g_start
                else:
                    gj = self._run_end(table, gi, last, True)
                    k, foff, gstart = DATA, e * unit + (pos - g_start), 0
                n = min(stop, t_start + gj * grain) - pos
                if k == kind and k != DEFLATE and (k != DATA or foff == run_off + run_len):
                    run_len += n
                else:
                    if run_len:
                        yield run_len, kind, run_off, run_gstart
                    kind, run_len, run_off, run_gstart = k, n, foff, gstart
                pos += n
        if run_len:
            yield run_len, kind, run_off, run_gstart
