"""Shared machinery for sparse, layered image formats (qcow2, VHD, VHDX).

Every one of these formats maps a virtual range to one of three things: bytes
at some offset of the image file, zeros, or "whatever the parent/backing file
says".  :class:`LayeredSource` turns such a per-format map into the
:class:`~ingest.formats.source.DiskSource` contract once, so coalescing of reads,
backing-file handling and the allocation map behave identically for all of
them.  The per-format modules only parse their tables.
"""

from __future__ import annotations

import abc
import contextlib
import contextvars
import errno
import os
import stat
from array import array
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from sys import byteorder
from typing import Any

from ingest.formats.raw import open_readonly
from ingest.formats.source import DiskSource, Extent, clip_extents, pread_exact
from repofs.errors import SourceError

# Kinds of a mapped run.  ``arg`` is the host file offset for DATA, a
# bytes-like object for BUF (already decoded data, e.g. a decompressed
# cluster) and unused otherwise.
ZERO = 0
DATA = 1
BACKING = 2
BUF = 3

#: Longest backing/parent chain we follow.  Real chains are short (tens of
#: snapshots at most); the limit only keeps a hostile chain from exhausting
#: file descriptors or the stack.
MAX_CHAIN_DEPTH = 64
#: Largest read whose assembly buffer a source keeps for reuse.
SCRATCH_LIMIT = 16 * 1024 * 1024

_OPENING: contextvars.ContextVar[tuple[str, ...]] = contextvars.ContextVar(
    "repofs_ingest_opening_chain", default=()
)


@dataclass(frozen=True)
class Trust:
    """Whose word the image being opened stands on, and where its references may point.

    A raw disk's owner, the guest, writes every byte of it, so a raw disk
    can look like any format; if its content decided the format, a guest
    could name a host file as its backing file or extent and have the
    backup store that file (qemu's CVE-2008-2004).  A file that image
    metadata names is therefore read only when the administrator vouched
    for that metadata, or when it lies in a directory they named.
    """

    #: The image's format was given by the administrator (``--format``) or
    #: stated by the metadata of a vouched image that names it, not detected.
    vouched: bool
    #: ``--backing-dir`` directories, symlinks resolved.
    backing_dirs: tuple[str, ...]
    #: Why an unvouched image's references are refused and what allows them,
    #: the tail of the one-line refusal.
    advice: str


#: The policy of the chain being opened.  ``None``, when a reader is
#: constructed directly, means its caller named the format by picking the
#: reader: references are followed as in qemu.
_TRUST: contextvars.ContextVar[Trust | None] = contextvars.ContextVar(
    "repofs_ingest_trust", default=None
)


@contextlib.contextmanager
def trusting(trust: Trust | None) -> Iterator[None]:
    """Open images under ``trust`` (see :func:`check_reference`)."""
    token = _TRUST.set(trust)
    try:
        yield
    finally:
        _TRUST.reset(token)


def inside(path: str, directory: str) -> bool:
    """Whether ``path`` is ``directory`` or below it (both already resolved)."""
    return path == directory or path.startswith(directory.rstrip("/") + "/")


def check_reference(child_path: str, name: str, path: str, what: str) -> None:
    """Refuse to open ``path``, named ``name`` by ``child_path``'s metadata, unless trusted.

    Trusted means: the child was vouched for (see :class:`Trust`), or
    ``path`` with every symlink resolved lies in a ``--backing-dir``.
    Called before the file is opened or even looked for, so a refused
    reference is never read.
    """
    trust = _TRUST.get()
    if trust is None or trust.vouched:
        return
    real = os.path.realpath(path)
    if any(inside(real, d) for d in trust.backing_dirs):
        return
    from ingest.formats.vmdk_descriptor import show

    shown = show(name)
    where = "" if real == name else f" (resolves to {show(real, None)})"
    raise SourceError(
        f"{show(child_path, None)}: {what} {shown!r}{where} is outside every --backing-dir; "
        f"{trust.advice}"
    )


class LRU:
    """A small bounded mapping: metadata caches must not grow with the disk.

    Bounded by ``limit`` entries, or by their summed ``weight`` (the grain tables
    of a VMDK differ in size); the newest entry is kept whatever it weighs.
    ``evicted`` is told of every value dropped, so a pool of open files closes them.
    """

    def __init__(
        self,
        limit: int,
        weight: Callable[[Any], int] | None = None,
        evicted: Callable[[Any], object] | None = None,
    ) -> None:
        self._limit = max(1, limit)
        self._weight = weight
        self._evicted = evicted
        self._used = 0
        self._data: OrderedDict[Any, Any] = OrderedDict()

    def get(self, key: Any) -> Any:
        value = self._data.get(key)
        if value is not None:
            self._data.move_to_end(key)
        return value

    def _drop(self, value: Any) -> None:
        self._used -= 1 if self._weight is None else self._weight(value)
        if self._evicted is not None:
            self._evicted(value)

    def put(self, key: Any, value: Any) -> None:
        old = self._data.pop(key, None)
        if old is not None:
            self._used -= 1 if self._weight is None else self._weight(old)
        self._data[key] = value
        self._used += 1 if self._weight is None else self._weight(value)
        while self._used > self._limit and len(self._data) > 1:
            self._drop(self._data.popitem(last=False)[1])

    def clear(self) -> None:
        """Drop every entry, newest first, telling ``evicted`` of each."""
        while self._data:
            self._drop(self._data.popitem()[1])


def file_size_of(fd: int) -> int:
    """Size of a regular file or block device behind ``fd``."""
    st = os.fstat(fd)
    if stat.S_ISBLK(st.st_mode):
        return os.lseek(fd, 0, os.SEEK_END)
    return st.st_size


def is_sparse(fd: int) -> bool:
    """Whether a regular file has holes worth asking ``SEEK_DATA`` about."""
    st = os.fstat(fd)
    return stat.S_ISREG(st.st_mode) and st.st_blocks * 512 < st.st_size


def pread_into(fd: int, view: memoryview, offset: int, path: str) -> None:
    """Fill ``view`` from ``fd`` at ``offset`` (no intermediate copy)."""
    want = len(view)
    got = 0
    while got < want:
        try:
            n = os.preadv(fd, [view[got:]], offset + got)
        except OSError as exc:
            raise SourceError(
                f"{path}: read error at offset {offset + got}: {exc.strerror}"
            ) from None
        if n == 0:
            raise SourceError(
                f"{path}: file is truncated: needed {want} bytes at offset {offset}, got {got}"
            )
        got += n


def bit_runs(bits: int, start: int, count: int) -> Iterator[tuple[int, int, int]]:
    """Yield ``(first_bit, length, value)`` runs of bits ``start..start+count`` of ``bits``.

    Bit ``i`` is ``(bits >> i) & 1`` (LSB first).  Uses big-int tricks so a
    4096-bit sector bitmap with few runs costs a handful of operations, not a
    Python loop per sector.
    """
    end = start + count
    pos = start
    inverted = ~bits
    while pos < end:
        value = (bits >> pos) & 1
        rest = (inverted if value else bits) >> pos
        if rest == 0:
            nxt = end
        else:
            nxt = pos + ((rest & -rest).bit_length() - 1)
            nxt = min(nxt, end)
        yield pos, nxt - pos, value
        pos = nxt


_REVERSE_BITS = bytes(int(f"{i:08b}"[::-1], 2) for i in range(256))


def msb_bitmap_to_int(data: bytes) -> int:
    """Turn an MSB-first bitmap (VHD) into an int with bit i = sector i."""
    return int.from_bytes(data.translate(_REVERSE_BITS), "little")


class TableCache:
    """Entries of an on-disk table of fixed-size integers, paged with a bounded LRU.

    Tables are sized by header fields; reading them a page at a time keeps
    memory bounded no matter what the header claims, and a table that lies
    past the end of the file is refused before anything is read.
    """

    PAGE_BYTES = 64 * 1024

    def __init__(
        self,
        src: LayeredSource,
        what: str,
        offset: int,
        count: int,
        itemsize: int,
        big_endian: bool,
        max_pages: int = 64,
    ) -> None:
        if offset < 0 or offset + count * itemsize > src.file_size:
            raise SourceError(
                f"{src.path}: {what} ({count} entries at offset {offset}) extends past "
                f"the end of the file ({src.file_size} bytes)"
            )
        self._src = src
        self._offset = offset
        self.count = count
        self._itemsize = itemsize
        self._code = {4: "I", 8: "Q"}[itemsize]
        if array(self._code).itemsize != itemsize:  # pragma: no cover - exotic platform
            self._code = {4: "L", 8: "Q"}[itemsize]
        self._swap = (byteorder == "little") == big_endian
        self.page_entries = self.PAGE_BYTES // itemsize
        self._pages = LRU(max_pages)

    def page(self, pno: int) -> array:
        """Entries ``pno * page_entries`` onward (the last page may be short)."""
        arr = self._pages.get(pno)
        if arr is None:
            first = pno * self.page_entries
            n = min(self.page_entries, self.count - first)
            raw = self._src.pread(self._offset + first * self._itemsize, n * self._itemsize)
            arr = array(self._code, raw)
            if self._swap:
                arr.byteswap()
            self._pages.put(pno, arr)
        return arr

    def __getitem__(self, index: int) -> int:
        if not 0 <= index < self.count:
            return 0
        pno, i = divmod(index, self.page_entries)
        return self.page(pno)[i]


def resolve_backing_name(child_path: str, name: str, what: str) -> str:
    """Resolve a backing/parent file name the way qemu does: relative to the child's directory."""
    if "\0" in name or not name:
        raise SourceError(f"{child_path}: {what} name {name!r} is not a usable file name")
    if name.startswith("file:"):
        name = name[5:]
    else:
        colon, slash = name.find(":"), name.find("/")
        if colon > 0 and (slash < 0 or colon < slash):
            raise SourceError(
                f"{child_path}: {what} {name!r} uses a protocol, only local files are supported"
            )
    if os.path.isabs(name):
        return name
    return os.path.join(os.path.dirname(child_path), name)


#: The reader registry (format names and the opener), set by ingest.formats.detect when it
#: is imported.  Readers open their backing files through it: importing the registry from
#: here made detect -> vhd -> imgutil -> detect an import cycle.
_REGISTRY: tuple[tuple[str, ...], Callable[..., DiskSource]] | None = None


def register_opener(formats: tuple[str, ...], opener: Callable[..., DiskSource]) -> None:
    """Called by :mod:`ingest.formats.detect`: the formats and the opener backing files use."""
    global _REGISTRY
    _REGISTRY = (formats, opener)


def open_backing(
    child_path: str,
    backing_path: str,
    fmt: str | None,
    what: str,
    *,
    name: str,
    expect: str | None = None,
) -> DiskSource:
    """Open a backing/parent image, named ``name`` in the child, through the registered opener.

    ``fmt`` is the format the child's metadata states for it; ``expect``
    the only format the child's own format allows (a VHD's parent is a
    VHD), checked against the detected one before the parent is parsed.
    Either keeps the parent vouched for when the child is; a parent whose
    format is detected is not, so its own references must lie in a
    ``--backing-dir`` (it may be a raw disk that looks like an image).

    The chain of files being opened is tracked in a context variable so a
    chain that loops back on itself, or is absurdly deep, is refused instead
    of recursing forever.
    """
    if _REGISTRY is None:
        raise SourceError(
            f"{child_path}: cannot open its {what}: no reader registry (open images through "
            "ingest.formats.detect.open_source)"
        )
    formats, open_layer = _REGISTRY
    stack = _OPENING.get() or (os.path.realpath(child_path),)
    real = os.path.realpath(backing_path)
    if real in stack:
        raise SourceError(
            f"{child_path}: {what} chain loops: {backing_path} is already part of the chain"
        )
    if len(stack) >= MAX_CHAIN_DEPTH:
        raise SourceError(
            f"{child_path}: {what} chain starting at {stack[0]} is deeper than "
            f"{MAX_CHAIN_DEPTH} files; refusing"
        )
    if fmt is not None and fmt not in formats:
        raise SourceError(f"{child_path}: {what} format {fmt!r} is not supported")
    check_reference(child_path, name, backing_path, what)
    if not os.path.lexists(backing_path):
        raise SourceError(f"{child_path}: {what} {backing_path} does not exist")
    trust = _TRUST.get()
    if trust is not None and fmt is None and expect is None:
        trust = Trust(
            False,
            trust.backing_dirs,
            f"the format of {what} {backing_path} was detected from its content, as "
            f"{child_path} does not state it: give --backing-dir with the directory that "
            f"holds the file, or record the format in {child_path} (qemu-img rebase -u -F)",
        )
    token = _OPENING.set((*stack, real))
    try:
        with trusting(trust):
            return open_layer(backing_path, fmt, expect=expect, what=what, child=child_path)
    finally:
        _OPENING.reset(token)


Run = tuple[int, int, Any]
Segment = tuple[int, int, int, int | None]


class LayeredSource(DiskSource):
    """Base for readers whose format maps virtual ranges to file data, zeros or a parent.

    Subclasses set :attr:`format_name`, ``self._size`` and optionally
    ``self._backing`` in :meth:`_parse`, and implement :meth:`_map` (exact,
    for reads) and :meth:`_segments` (whole-disk walk, for the allocation map).
    The constructor closes every file it opened when :meth:`_parse` fails, so
    no reader has to repeat that.
    """

    def __init__(self, path: str, fd: int | None = None) -> None:
        self.path = path
        self._fd = open_readonly(path) if fd is None else fd
        self._backing: DiskSource | None = None
        self._size = 0
        self._scratch_buf: bytearray | None = None
        try:
            self.file_size = file_size_of(self._fd)
            self._sparse = is_sparse(self._fd)
        except OSError as exc:
            os.close(self._fd)
            raise SourceError(f"{path}: cannot stat: {exc.strerror}") from None
        # Where DATA runs live; qcow2 with an external data file overrides these.
        self._data_fd = self._fd
        self._data_path = path
        self._data_size = self.file_size
        try:
            self._parse()
        except BaseException:
            self.close()
            raise

    # -- helpers for subclasses -------------------------------------------

    def pread(self, offset: int, length: int) -> bytes:
        """Read metadata of this image file; a short read is a SourceError."""
        if length == 0:
            return b""
        return pread_exact(self._fd, length, offset, self.path)

    def fail(self, message: str) -> SourceError:
        """Build the one-line error for this file."""
        return SourceError(f"{self.path}: {message}")

    def _open_parent_of(
        self, candidates: dict[str, str], kind: type[LayeredSource], label: str
    ) -> tuple[str, Any]:
        """Open the first existing of ``candidates`` (path -> name in this file) as the parent.

        VHD and VHDX name their parent by several paths and allow only their own
        format as it; returns ``(path, parent)`` so the caller checks the parent's identity.
        """
        found = next((p for p in candidates if os.path.exists(p)), None)
        if found is None:
            raise self.fail(f"parent {label} not found (tried {', '.join(candidates)})")
        parent = open_backing(
            self.path, found, None, "parent", name=candidates[found], expect=label.lower()
        )
        self._backing = parent
        if not isinstance(parent, kind):
            raise self.fail(f"parent {found} is a {parent.format_name} image, not a {label}")
        return found, parent

    @staticmethod
    def map_by_blocks(
        offset: int,
        length: int,
        block_size: int,
        block_runs: Callable[[int, int, int], Iterable[tuple[int, int, int, int | None]]],
    ) -> Iterator[Run]:
        """:meth:`_map` for formats of fixed-size blocks (VHD, VHDX).

        ``block_runs(block, start, end)`` yields ``(offset_in_block, length,
        kind, host)`` for bytes ``start..end`` of one block.
        """
        pos, end = offset, offset + length
        while pos < end:
            block = pos // block_size
            base = block * block_size
            stop = min(end, base + block_size)
            for _a, n, kind, host in block_runs(block, pos - base, stop - base):
                yield kind, n, host
            pos = stop

    # -- subclass interface ----------------------------------------------

    @abc.abstractmethod
    def _parse(self) -> None:
        """Read and check the image's headers and tables (and open its parent)."""

    @abc.abstractmethod
    def _map(self, offset: int, length: int) -> Iterable[Run]:
        """Yield ``(kind, length, arg)`` runs covering exactly ``[offset, offset+length)``."""

    @abc.abstractmethod
    def _segments(self) -> Iterable[Segment]:
        """Yield ``(offset, length, kind, host)`` in order over the whole disk.

        ``kind`` is DATA (host is the file offset, or None when unknown, e.g.
        compressed), ZERO or BACKING.  Gaps are allowed and mean ZERO.
        """

    # -- DiskSource ---------------------------------------------------------

    @property
    def size(self) -> int:
        """The virtual size rounded up to whole 512-byte sectors, as for raw files.

        A VMDK extent is counted in sectors, so the flat file in the mount
        must be too; a qcow2 or VHD header may give any byte count.  The
        padding reads as zeros (see :meth:`read`).
        """
        return -(-self._size // 512) * 512

    def chain(self) -> list[str]:
        files = [self.path]
        if self._data_path != self.path:
            files.append(self._data_path)
        if self._backing is not None:
            files.extend(self._backing.chain())
        return files

    def close(self) -> None:
        backing, self._backing = self._backing, None
        if backing is not None:
            backing.close()
        if self._data_fd >= 0 and self._data_fd != self._fd:
            os.close(self._data_fd)
        self._data_fd = -1
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def read(self, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise self.fail(
                f"read of {length} bytes at offset {offset} is outside the disk ({self.size} bytes)"
            )
        # Past the header's size (the padding to a whole sector) is zeros, whatever
        # the last cluster or block of the file holds there.
        inside = max(0, min(length, self._size - offset))
        if inside < length:
            return self._read_virtual(offset, inside) + bytes(length - inside)
        return self._read_virtual(offset, length)

    def _read_virtual(self, offset: int, length: int) -> bytes:
        """:meth:`read` of ``[offset, offset+length)`` inside the header's virtual size."""
        if length == 0:
            return b""
        runs: list[list[Any]] = []
        for kind, n, arg in self._map(offset, length):
            if n <= 0:
                continue
            if runs:
                last = runs[-1]
                if last[0] == kind and (
                    kind in (ZERO, BACKING) or (kind == DATA and last[2] + last[1] == arg)
                ):
                    last[1] += n
                    continue
            runs.append([kind, n, arg])
        if sum(r[1] for r in runs) != length:  # pragma: no cover - reader bug guard
            raise self.fail(f"internal error: map of {length} bytes at {offset} is incomplete")
        if len(runs) == 1:
            kind, n, arg = runs[0]
            if kind == DATA:
                self._check_data(arg, n, offset)
                return pread_exact(self._data_fd, n, arg, self._data_path)
            if kind == ZERO:
                return bytes(n)
            if kind == BACKING:
                return self._read_backing(offset, n)
            return bytes(arg)
        view = self._scratch(length)
        pos = 0
        for kind, n, arg in runs:
            if kind == DATA:
                self._check_data(arg, n, offset + pos)
                pread_into(self._data_fd, view[pos : pos + n], arg, self._data_path)
            elif kind == BACKING:
                view[pos : pos + n] = self._read_backing(offset + pos, n)
            elif kind == BUF:
                view[pos : pos + n] = arg
            else:
                view[pos : pos + n] = bytes(n)
            pos += n
        return bytes(view)

    def _scratch(self, length: int) -> memoryview:
        """A reusable buffer for assembling reads made of several runs.

        A fresh 4 MiB ``bytearray`` per read costs about ten times the read
        itself in page faults; reusing one warm buffer leaves one copy.  Only
        buffers up to :data:`SCRATCH_LIMIT` are kept.
        """
        if length > SCRATCH_LIMIT:
            return memoryview(bytearray(length))
        buf = self._scratch_buf
        if buf is None or len(buf) < length:
            buf = self._scratch_buf = bytearray(max(length, 1 << 20))
        return memoryview(buf)[:length]

    def _check_data(self, host: int, n: int, voff: int) -> None:
        if host < 0 or host + n > self._data_size:
            raise SourceError(
                f"{self._data_path}: data for virtual offset {voff} maps to file offset "
                f"{host}, past the end of the file ({self._data_size} bytes)"
            )

    def _read_backing(self, offset: int, length: int) -> bytes:
        """Read from the backing file; beyond its end (smaller backing) reads zeros."""
        backing = self._backing
        if backing is None:
            return bytes(length)
        bsize = backing.size
        if offset >= bsize:
            return bytes(length)
        if offset + length <= bsize:
            return backing.read(offset, length)
        return backing.read(offset, bsize - offset) + bytes(offset + length - bsize)

    def allocated_extents(self) -> Iterator[Extent]:
        return clip_extents(self._allocated(), self._size)

    def _allocated(self) -> Iterator[Extent]:
        backing_iter = (
            iter(clip_extents(self._backing.allocated_extents(), self._backing.size))
            if self._backing is not None
            else None
        )
        cur: Extent | None = next(backing_iter, None) if backing_iter else None
        for off, n, kind, host in self._merged_segments():
            end = off + n
            if kind == DATA:
                if host is not None and self._sparse:
                    yield from self._file_data(off, n, host)
                else:
                    yield off, n
            elif kind == BACKING and backing_iter is not None:
                while cur is not None and cur[0] + cur[1] <= off:
                    cur = next(backing_iter, None)
                while cur is not None and cur[0] < end:
                    cstart, cend = cur[0], cur[0] + cur[1]
                    yield max(off, cstart), min(end, cend) - max(off, cstart)
                    if cend <= end:
                        cur = next(backing_iter, None)
                    else:
                        break

    def _merged_segments(self) -> Iterator[Segment]:
        pend: list[Any] | None = None
        for off, n, kind, host in self._segments():
            if n <= 0:
                continue
            if kind == ZERO:
                continue
            if (
                pend is not None
                and pend[0] + pend[1] == off
                and pend[2] == kind
                and (
                    kind == BACKING
                    or (host is None and pend[3] is None)
                    or (host is not None and pend[3] is not None and pend[3] + pend[1] == host)
                )
            ):
                pend[1] += n
                continue
            if pend is not None:
                yield pend[0], pend[1], pend[2], pend[3]
            pend = [off, n, kind, host]
        if pend is not None:
            yield pend[0], pend[1], pend[2], pend[3]

    def _file_data(self, off: int, n: int, host: int) -> Iterator[Extent]:
        """Parts of host range ``[host, host+n)`` that are not holes in a sparse file."""
        fd, pos, end = self._data_fd, host, host + n
        while pos < end:
            try:
                data = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:
                    return
                yield off + (pos - host), end - pos
                return
            if data >= end:
                return
            hole = min(os.lseek(fd, data, os.SEEK_HOLE), end)
            yield off + (data - host), hole - data
            pos = hole
