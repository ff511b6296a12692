"""The VMDK disk source: one descriptor or sparse file, its extents, and its parent chain.

Opening resolves the whole snapshot chain up front, so that every structural
problem (missing extent or parent, CID mismatch, loop, bad header) is found
before ingest reads a byte.  Reads then go child first: ranges a layer does
not allocate fall through to its parent, explicitly zero grains do not, and
neighbouring data that is contiguous in one file is fetched with one pread.
"""

from __future__ import annotations

import bisect
import os
import re
from collections.abc import Iterator

from ingest.formats.imgutil import check_reference
from ingest.formats.source import DiskSource, Extent, clip_extents
from ingest.formats.vmdk_cowd import MAGIC as COWD_MAGIC
from ingest.formats.vmdk_cowd import CowdExtent, parse_cowd_header
from ingest.formats.vmdk_descriptor import (
    MAX_DESCRIPTOR_BYTES,
    Descriptor,
    looks_like_descriptor,
    parse_descriptor,
    show,
)
from ingest.formats.vmdk_extent import (
    DATA,
    DEFLATE,
    SECTOR,
    UNALLOC,
    ZERO,
    ExtentFile,
    FilePool,
    FlatExtent,
    TableCache,
    ZeroExtent,
)
from ingest.formats.vmdk_extent import Extent as VmdkExtent
from ingest.formats.vmdk_sesparse import MAGIC_BYTES as SESPARSE_MAGIC
from ingest.formats.vmdk_sesparse import SESparseExtent, parse_sesparse_header
from ingest.formats.vmdk_sparse import MAGIC as SPARSE_MAGIC
from ingest.formats.vmdk_sparse import SparseExtent, parse_sparse_header, read_embedded_descriptor
from repofs.errors import SourceError

#: Deeper chains than this are not snapshot trees anyone runs; the bound also
#: caps recursion when resolving a read.
MAX_CHAIN_DEPTH = 64
#: allocated_extents() resolves the disk in windows of this size.
_ALLOC_WINDOW = 256 << 20
#: Data pieces closer than this in a file are fetched with one pread ...
_GATHER_GAP = 64 << 10
#: ... as long as the span read stays this small.
_GATHER_SPAN = 16 << 20

#: One resolved run of the virtual disk:
#: ``(offset, length, kind, extent, file_offset, grain_start, offset_in_grain)``.
PlanPiece = tuple[int, int, int, VmdkExtent | None, int, int, int]


def looks_like_vmdk(head: bytes) -> bool:
    """Whether a file's first bytes are any VMDK file a user might point ingest at."""
    return (
        head[:4] in (SPARSE_MAGIC, COWD_MAGIC)
        or head[:8] == SESPARSE_MAGIC
        or looks_like_descriptor(head)
    )


class _Image:
    """One VMDK: a descriptor with its extents, or a self-describing sparse file."""

    def __init__(
        self,
        path: str,
        main: ExtentFile,
        create_type: str,
        descriptor: Descriptor,
        extents: list[VmdkExtent],
        files: list[str],
    ) -> None:
        self.path = path
        self.name = main.path  # printable, for messages
        self.main = main
        self.create_type = create_type
        self.cid = descriptor.cid
        self.parent_cid = descriptor.parent_cid
        self.parent_hint = descriptor.parent_hint
        self.extents = extents
        self.starts: list[int] = []
        pos = 0
        for ext in extents:
            self.starts.append(pos)
            pos += ext.size
        self.size = pos
        self.files = files

    def map(self, offset: int, length: int, for_alloc: bool) -> Iterator[PlanPiece]:
        end = offset + length
        i = bisect.bisect_right(self.starts, offset) - 1
        pos = offset
        while pos < end:
            ext, base = self.extents[i], self.starts[i]
            stop = min(end, base + ext.size)
            for n, kind, foff, gstart in ext.map(pos - base, stop - pos, for_alloc):
                gofs = pos - base - gstart if kind == DEFLATE else 0
                yield pos, n, kind, ext, foff, gstart, gofs
                pos += n
            i += 1


class VmdkSource(DiskSource):
    """A VMDK of any supported subformat, read through its whole snapshot chain."""

    def __init__(self, path: str, fd: int | None = None) -> None:
        self.path = path
        self._pool = FilePool()
        self._cache = TableCache()
        self._chain: list[_Image] = []
        try:
            self._open_chain(path, fd)
        except BaseException:
            self._pool.close()
            raise
        top = self._chain[0]
        self.format_name = f"vmdk:{top.create_type}"
        self._size = top.size

    # -- opening -------------------------------------------------------------

    def _open_chain(self, path: str, fd: int | None) -> None:
        image = self._open_image(path, fd)
        self._chain.append(image)
        seen = {image.main.identity: path}
        while image.parent_hint is not None:
            if len(self._chain) >= MAX_CHAIN_DEPTH:
                raise SourceError(
                    f"{self.path}: snapshot chain is deeper than {MAX_CHAIN_DEPTH} disks"
                )
            parent_path = self._find_parent(image)
            check_reference(image.path, image.parent_hint, parent_path, "parent")
            try:
                st = os.stat(parent_path)
            except OSError as exc:
                raise SourceError(
                    f"{show(parent_path, None)}: cannot stat parent: {exc.strerror}"
                ) from None
            if (st.st_dev, st.st_ino) in seen:
                raise SourceError(
                    f"{image.name}: snapshot chain loops: parent {show(parent_path, None)} is "
                    f"already in the chain (as {show(seen[(st.st_dev, st.st_ino)], None)})"
                )
            parent = self._open_image(parent_path, None)
            if parent.cid is None:
                raise SourceError(
                    f"{parent.name}: parent of {image.name} has no CID, so it cannot be "
                    "verified as the right parent"
                )
            if parent.cid != image.parent_cid:
                raise SourceError(
                    f"{image.name}: parentCID {image.parent_cid:08x} does not match CID "
                    f"{parent.cid:08x} of parent {parent.name}: the parent changed after the "
                    "snapshot was taken, or is the wrong file"
                )
            seen[parent.main.identity] = parent_path
            self._chain.append(parent)
            image = parent

    @staticmethod
    def _find_parent(image: _Image) -> str:
        """Resolve ``parentFileNameHint`` against the child's directory.

        ESXi writes absolute ``/vmfs/volumes/...`` hints and Workstation may
        write Windows paths; when the hint does not exist as given, the same
        file name next to the child is tried.  The CID check guards the guess.
        """
        hint = image.parent_hint
        assert hint is not None
        base = os.path.dirname(image.path)
        first = os.path.join(base, hint)
        if os.path.exists(first):
            return first
        alt = os.path.join(base, re.split(r"[\\/]", hint)[-1])
        if alt != first and os.path.exists(alt):
            return alt
        tried = show(first, None) if alt == first else f"{show(first, None)} or {show(alt, None)}"
        raise SourceError(f"{image.name}: parent {show(hint)!r} not found (looked for {tried})")

    def _open_image(self, path: str, fd: int | None) -> _Image:
        main = ExtentFile(path, self._pool, fd)
        name = main.path  # printable form of path, for messages
        if main.size == 0:
            raise SourceError(f"{name}: is empty (0 bytes)")
        head = main.pread(min(main.size, 4096), 0, "header")
        if head[:4] == SPARSE_MAGIC:
            header = parse_sparse_header(head[:SECTOR], name)
            if header.capacity == 0 and header.desc_offset:
                # A descriptor kept in a sparse container (qemu reads these too).
                data = main.pread(
                    header.desc_size * SECTOR, header.desc_offset * SECTOR, "descriptor"
                )
                return self._from_descriptor(path, main, parse_descriptor(data, name))
            descriptor = read_embedded_descriptor(main, header)
            if descriptor is None or (
                descriptor.create_type is None and descriptor.cid is None
                and not descriptor.extents
            ):
                # Extents of split sparse disks carry an empty (or no) descriptor.
                raise SourceError(
                    f"{name}: is one extent of a split sparse VMDK, without a descriptor; "
                    "open the descriptor .vmdk that lists it"
                )
            if header.capacity == 0:
                raise SourceError(f"{name}: sparse capacity is zero")
            extent = SparseExtent(main, header, header.capacity * SECTOR, self._cache)
            create_type = descriptor.create_type or (
                "streamOptimized" if extent.compressed else "monolithicSparse"
            )
            return _Image(path, main, create_type, descriptor, [extent], [path])
        if head[:4] == COWD_MAGIC or head[:8] == SESPARSE_MAGIC:
            raise SourceError(
                f"{name}: is the data extent of a snapshot delta; open the descriptor .vmdk "
                "that lists it (it names the parent disk)"
            )
        if not looks_like_descriptor(head):
            raise SourceError(
                f"{name}: not a VMDK: no KDMV/COWD/SEsparse magic and no text descriptor"
            )
        if main.size > MAX_DESCRIPTOR_BYTES:
            raise SourceError(
                f"{name}: looks like a text descriptor but is {main.size} bytes, too large "
                "for one"
            )
        return self._from_descriptor(path, main, parse_descriptor(main.pread(main.size, 0), name))

    def _from_descriptor(self, path: str, main: ExtentFile, desc: Descriptor) -> _Image:
        base = os.path.dirname(path)
        name = main.path
        files: dict[str, ExtentFile] = {}
        extents: list[VmdkExtent] = []
        for line in desc.extents:
            size = line.sectors * SECTOR
            if line.kind == "ZERO":
                extents.append(ZeroExtent(size))
                continue
            assert line.filename is not None
            epath = os.path.join(base, line.filename)
            efile = files.get(epath)
            if efile is None:
                check_reference(path, line.filename, epath, "extent file")
                if not os.path.lexists(epath):
                    raise SourceError(
                        f"{name}: extent file {show(line.filename)!r} is missing "
                        f"(looked for {show(epath, None)})"
                    )
                efile = ExtentFile(epath, self._pool)
                files[epath] = efile
            extents.append(self._open_extent(line.kind, efile, size, line.offset * SECTOR))
        create_type = desc.create_type
        assert create_type is not None
        return _Image(path, main, create_type, desc, extents, [path, *files])

    def _open_extent(self, kind: str, efile: ExtentFile, size: int, start: int) -> VmdkExtent:
        if kind in ("FLAT", "VMFS"):
            return FlatExtent(efile, size, start)
        head = efile.pread(min(efile.size, 2048), 0, "extent header")
        if kind == "SESPARSE":
            return SESparseExtent(efile, parse_sesparse_header(head, efile.path), size, self._cache)
        # SPARSE and VMFSSPARSE extents are told apart by magic, as VMware does.
        if head[:4] == SPARSE_MAGIC:
            header = parse_sparse_header(head, efile.path)
            return SparseExtent(efile, header, size, self._cache)
        if head[:4] == COWD_MAGIC:
            return CowdExtent(efile, parse_cowd_header(head, efile.path), size, self._cache)
        raise SourceError(
            f"{efile.path}: {kind} extent has neither a KDMV nor a COWD header "
            f"(starts with {head[:4]!r})"
        )

    # -- DiskSource ----------------------------------------------------------

    @property
    def size(self) -> int:
        return self._size

    def chain(self) -> list[str]:
        files: dict[str, None] = {}
        for image in self._chain:
            for f in image.files:
                files.setdefault(f, None)
        return list(files)

    def close(self) -> None:
        self._pool.close()

    def _resolve(
        self, level: int, offset: int, length: int, for_alloc: bool, out: list[PlanPiece]
    ) -> None:
        image = self._chain[level]
        for piece in image.map(offset, length, for_alloc):
            if piece[2] != UNALLOC:
                out.append(piece)
                continue
            voff, n = piece[0], piece[1]
            inside = 0
            if level + 1 < len(self._chain):
                inside = max(0, min(voff + n, self._chain[level + 1].size) - voff)
                if inside:
                    self._resolve(level + 1, voff, inside, for_alloc, out)
            if inside < n:
                out.append((voff + inside, n - inside, ZERO, None, 0, 0, 0))

    def plan(self, offset: int, length: int, for_alloc: bool = False) -> list[PlanPiece]:
        """Resolve a range through the chain into merged pieces (exposed for tests)."""
        raw: list[PlanPiece] = []
        self._resolve(0, offset, length, for_alloc, raw)
        merged: list[PlanPiece] = []
        for piece in raw:
            if merged:
                last = merged[-1]
                if last[2] == piece[2] == ZERO:
                    merged[-1] = (last[0], last[1] + piece[1], ZERO, None, 0, 0, 0)
                    continue
                if (
                    last[2] == piece[2] == DATA
                    and last[3] is not None
                    and piece[3] is not None
                    and last[3].file is piece[3].file
                    and last[4] + last[1] == piece[4]
                ):
                    merged[-1] = (last[0], last[1] + piece[1], DATA, last[3], last[4], 0, 0)
                    continue
            merged.append(piece)
        return merged

    def allocated_extents(self) -> Iterator[Extent]:
        return clip_extents(self._allocated(), self._size)

    def _allocated(self) -> Iterator[Extent]:
        for offset in range(0, self._size, _ALLOC_WINDOW):
            length = min(_ALLOC_WINDOW, self._size - offset)
            for piece in self.plan(offset, length, for_alloc=True):
                if piece[2] in (DATA, DEFLATE):
                    yield piece[0], piece[1]

    @staticmethod
    def _gather(file: ExtentFile, pieces: list[tuple[int, int, int]], view: memoryview) -> None:
        for span in _spans(pieces):
            if len(span) == 1:
                foff, pos, n = span[0]
                file.preadinto(view[pos : pos + n], foff)
                continue
            start = span[0][0]
            data = memoryview(file.pread(max(f + n for f, _, n in span) - start, start))
            for foff, pos, n in span:
                view[pos : pos + n] = data[foff - start : foff - start + n]

    def read(self, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0 or offset + length > self._size:
            raise ValueError(f"read of {length} bytes at {offset} is outside the disk")
        if length == 0:
            return b""
        plan = self.plan(offset, length)
        if len(plan) == 1:
            only = plan[0]
            if only[2] == DATA:
                assert only[3] is not None and only[3].file is not None
                return only[3].file.pread(length, only[4])
            if only[2] == ZERO:
                return bytes(length)
        buf = bytearray(length)
        view = memoryview(buf)
        compressed: dict[VmdkExtent, list[PlanPiece]] = {}
        scattered: dict[ExtentFile, list[tuple[int, int, int]]] = {}
        for piece in plan:
            voff, n, kind, ext = piece[0], piece[1], piece[2], piece[3]
            if kind == DATA:
                assert ext is not None and ext.file is not None
                scattered.setdefault(ext.file, []).append((piece[4], voff - offset, n))
            elif kind == DEFLATE:
                assert ext is not None
                compressed.setdefault(ext, []).append(piece)
        for file, pieces in scattered.items():
            self._gather(file, pieces, view)
        for ext, pieces in compressed.items():
            grains = ext.inflate([(p[4], p[5]) for p in pieces])
            for voff, n, _kind, _ext, foff, gstart, gofs in pieces:
                pos = voff - offset
                view[pos : pos + n] = grains[foff, gstart][gofs : gofs + n]
        return bytes(buf)


def _spans(pieces: list[tuple[int, int, int]]) -> Iterator[list[tuple[int, int, int]]]:
    """Group ``(file_offset, out_pos, length)`` pieces into spans worth one pread each.

    Snapshot deltas store grains in the order the guest wrote them, so the
    grains of one read are often near each other in the file but permuted
    (or separated by small gaps).  Reading the covering span once and
    copying out beats one tiny pread per grain; large gaps are not read.
    """
    pieces.sort()
    span = [pieces[0]]
    start = pieces[0][0]
    end = start + pieces[0][2]
    for piece in pieces[1:]:
        foff, _pos, n = piece
        if foff - end <= _GATHER_GAP and max(end, foff + n) - start <= _GATHER_SPAN:
            span.append(piece)
            end = max(end, foff + n)
        else:
            yield span
            span, start, end = [piece], foff, foff + n
    yield span


def open_vmdk(path: str, fd: int | None = None) -> VmdkSource:
    """Open a VMDK (descriptor, monolithic sparse or stream file) and its parents.

    ``fd``, if given, is an already open descriptor of ``path`` that the
    source takes over.
    """
    return VmdkSource(path, fd)
