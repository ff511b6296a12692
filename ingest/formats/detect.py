"""Choosing a reader for a source by its content (or by ``--format``)."""

from __future__ import annotations

import importlib
import os
import stat
from collections.abc import Iterable

from ingest.formats.imgutil import Trust, register_opener, trusting
from ingest.formats.raw import RawSource, open_readonly
from ingest.formats.source import DiskSource
from repofs.errors import SourceError

#: Formats ``--format`` accepts, each with the module and opener of its reader.
#: Readers are imported on first use, so a plain raw ingest loads none of them.
READERS = {
    "vmdk": ("ingest.formats.vmdk", "open_vmdk"),
    "qcow2": ("ingest.formats.qcow2", "Qcow2Source"),
    "vhd": ("ingest.formats.vhd", "VhdSource"),
    "vhdx": ("ingest.formats.vhdx", "VhdxSource"),
}
FORMATS = ("raw", *READERS)


def _could_be_vmdk(head: bytes) -> bool:
    """A cheap superset of :func:`ingest.formats.vmdk.looks_like_vmdk`.

    Sparse, COWD and SEsparse files start with their magic; a descriptor's
    text, up to its first NUL, holds its first line or a ``createType``
    line.  A disk image's first bytes hold neither.
    """
    text = head.partition(b"\0")[0]
    return (
        head[:4] in (b"KDMV", b"COWD")
        or head[:8] == (0xCAFEBABE).to_bytes(8, "little")
        or b"DescriptorFile" in text
        or b"createType" in text
    )


def detect_format(path: str, head: bytes) -> str:
    """Name the format of ``path`` from its content; ``raw`` when nothing matches.

    Magic numbers at the start are checked first; a fixed VHD, which is raw
    data followed by a footer, is recognised last by its final 512 bytes,
    and a VHDX by its headers when its first bytes are damaged.
    """
    if head[:4] == b"QFI\xfb":
        return "qcow2"
    if head[:8] == b"vhdxfile":
        return "vhdx"
    if head[:8] == b"conectix":  # dynamic/differencing VHD: footer copy at offset 0
        return "vhd"
    if _could_be_vmdk(head):
        from ingest.formats.vmdk import looks_like_vmdk  # 50 ms of imports: only when it may be one

        if looks_like_vmdk(head):
            return "vmdk"
    return _detect_without_magic(path)


#: Where a VHDX keeps its two headers; a raw disk holds a valid one there only by design.
VHDX_HEADER_OFFSETS = (64 * 1024, 128 * 1024)


def _detect_without_magic(path: str) -> str:
    """What a file whose first bytes name no format still shows, read through one descriptor.

    A VHD footer in its last 512 bytes: a fixed VHD, or a dynamic one whose
    footer copy at offset 0 is damaged.  A valid VHDX header at 64 or 128
    KiB behind a damaged file identifier: refused, as storing the container's
    bytes as a raw disk would be a wrong backup without a word.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return "raw"
    try:
        size = os.lseek(fd, 0, os.SEEK_END)  # block devices too, where st_size is 0
        if size < 1024:
            return "raw"
        last = os.pread(fd, 512, size - 512)
        if last[:8] == b"conectix":  # only then import the VHD reader (uuid, urllib)
            from ingest.formats.vhd import parse_footer

            if parse_footer(last) is not None:
                return "vhd"
        for offset in VHDX_HEADER_OFFSETS:
            header = os.pread(fd, 4096, offset) if offset + 4096 <= size else b""
            if header[:4] == b"head":
                from ingest.formats.vhdx import is_valid_header

                if is_valid_header(header):
                    raise SourceError(
                        f"{path}: a VHDX image whose file identifier is damaged (a valid "
                        f"VHDX header at {offset // 1024} KiB); give --format raw to store "
                        "its bytes as they are"
                    )
    except OSError:
        return "raw"
    finally:
        os.close(fd)
    return "raw"


def open_source(
    path: str, fmt: str | None = None, *, backing_dirs: Iterable[str] = ()
) -> DiskSource:
    """Open the disk the administrator named: with the reader for ``fmt``, or for its content.

    Without ``fmt`` a block device is raw: its every byte is the guest's,
    so its content proves nothing.  A file is taken for what its content
    shows; a raw disk's owner can make it look like any format, so a file
    that its metadata names (backing file, extent, parent) is read only when
    ``fmt`` was given or the file lies in one of ``backing_dirs`` (see
    :class:`ingest.formats.imgutil.Trust`).
    """
    if fmt is not None and fmt not in FORMATS:
        raise SourceError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    dirs = tuple(os.path.realpath(d) for d in backing_dirs)
    fd = open_readonly(path)
    chosen = _choose(path, fd, fmt, None)
    advice = (
        f"its format, {chosen}, was detected from the disk's content, which the guest "
        f"writes: give --format {chosen} for this disk if it is one, or --backing-dir "
        "with the directory that holds the file"
    )
    with trusting(Trust(fmt is not None, dirs, advice)):
        return _open_fd(path, fd, chosen)


def open_layer(
    path: str, fmt: str | None, *, expect: str | None = None, what: str = "", child: str = ""
) -> DiskSource:
    """Open a file another image names, under the policy its opener set (see ``open_backing``).

    ``fmt`` is the format the naming image states; without one a block
    device is ``expect`` or raw and a file is detected, and a detected
    format other than ``expect`` is refused before the file is parsed.
    """
    fd = open_readonly(path)
    chosen = _choose(path, fd, fmt, expect)
    if expect is not None and chosen != expect:
        os.close(fd)
        raise SourceError(f"{child}: {what} {path} is a {chosen} image, not a {expect.upper()}")
    return _open_fd(path, fd, chosen)


def _choose(path: str, fd: int, fmt: str | None, expect: str | None) -> str:
    """The format to read ``fd`` with; closes ``fd`` on failure."""
    if fmt is not None:
        return fmt
    try:
        if stat.S_ISBLK(os.fstat(fd).st_mode):
            return expect or "raw"
        return detect_format(path, os.pread(fd, 4096, 0))
    except OSError as exc:
        os.close(fd)
        raise SourceError(f"{path}: cannot read: {exc.strerror}") from None
    except BaseException:
        os.close(fd)
        raise


def _open_fd(path: str, fd: int, chosen: str) -> DiskSource:
    """The reader for ``chosen`` on ``fd``, which it takes over."""
    if chosen == "raw":
        return RawSource(path, fd)
    module, opener = READERS[chosen]
    try:
        reader = getattr(importlib.import_module(module), opener)
    except BaseException:
        os.close(fd)
        raise
    source: DiskSource = reader(path, fd)
    if source.size == 0:  # qemu-img creates such images; there is nothing to back up
        source.close()
        raise SourceError(f"{path}: the disk's virtual size is 0 bytes")
    return source


register_opener(FORMATS, open_layer)
