"""Raw disk images and block devices."""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterable, Iterator

from ingest.formats.source import DiskSource, Extent, pread_exact
from repofs.errors import SourceError
from repofs.util.directio import SequentialReader


def open_readonly(path: str, what: str = "disk image", *, devices: bool = True) -> int:
    """Open a regular file (or, with ``devices``, a block device) for reading.

    Opened non-blocking, so a FIFO given by mistake is refused instead of
    hanging the ingest until something writes to it; a character device
    such as ``/dev/zero`` would never end, so it is refused too.  ``what``
    names the file's role in the one-line errors.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        gone = "no such file or device" if devices else f"{what} does not exist"
        raise SourceError(f"{path}: {gone}") from None
    except IsADirectoryError:
        raise SourceError(f"{path}: is a directory, not a {what}") from None
    except OSError as exc:
        raise SourceError(f"{path}: cannot open: {exc.strerror}") from None
    st = os.fstat(fd)
    if stat.S_ISDIR(st.st_mode):
        os.close(fd)
        raise SourceError(f"{path}: is a directory, not a {what}")
    if not (stat.S_ISREG(st.st_mode) or (devices and stat.S_ISBLK(st.st_mode))):
        os.close(fd)
        wrong = "not a regular file or block device" if devices else f"{what} is not a regular file"
        raise SourceError(f"{path}: {wrong}")
    os.set_blocking(fd, True)
    return fd


def read_small_file(path: str, limit: int, what: str) -> bytes:
    """The whole of a regular file of at most ``limit`` bytes, for config files and lists.

    ``stat`` says nothing about a FIFO or a device (size 0) and a file can
    grow while it is read, so the limit is enforced on what is read: one
    byte past it is an error, and memory stays bounded whatever ``path`` is.
    """
    fd = open_readonly(path, what, devices=False)
    with os.fdopen(fd, "rb") as f:
        size = os.fstat(fd).st_size
        if size > limit:
            raise SourceError(f"{path}: {what} is {size} bytes; at most {limit}")
        try:
            data = f.read(limit + 1)
        except OSError as exc:
            raise SourceError(f"{path}: cannot read {what}: {exc.strerror}") from None
    if len(data) > limit:
        raise SourceError(f"{path}: {what} grew past {limit} bytes while it was read")
    return data


class RawSource(DiskSource):
    """A raw image file or block device, read as-is.

    Holes of sparse files are found with ``SEEK_DATA``/``SEEK_HOLE`` and never
    read.  The capacity is the file size rounded up to whole 512-byte sectors
    (a VMDK extent is counted in sectors); the padding reads as zeros.
    """

    format_name = "raw"

    def __init__(self, path: str, fd: int | None = None) -> None:
        self.path = path
        self._fd = open_readonly(path) if fd is None else fd
        st = os.fstat(self._fd)
        self._is_block = stat.S_ISBLK(st.st_mode)
        if self._is_block:
            self._file_size = os.lseek(self._fd, 0, os.SEEK_END)
        elif stat.S_ISREG(st.st_mode):
            self._file_size = st.st_size
        else:
            os.close(self._fd)
            raise SourceError(f"{path}: not a regular file or block device")
        if self._file_size == 0:
            os.close(self._fd)
            raise SourceError(f"{path}: is empty (0 bytes)")
        if self._is_block:
            try:
                os.pread(self._fd, 512, 0)
            except OSError as exc:
                os.close(self._fd)
                raise SourceError(f"{path}: block device is unreadable: {exc.strerror}") from None
        self._size = (self._file_size + 511) // 512 * 512

    @property
    def size(self) -> int:
        return self._size

    def allocated_extents(self) -> Iterator[Extent]:
        yield from self._data_in(0, self._file_size)

    def allocated_within(self, ranges: Iterable[Extent]) -> Iterator[Extent]:
        for offset, length in ranges:
            yield from self._data_in(offset, min(offset + length, self._file_size))

    def _data_in(self, pos: int, end: int) -> Iterator[Extent]:
        """The data (not holes) of ``[pos, end)`` of the file."""
        if self._is_block:
            if pos < end:
                yield pos, end - pos
            return
        while pos < end:
            try:
                data = os.lseek(self._fd, pos, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:  # no data after pos
                    return
                if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP):
                    yield pos, end - pos  # filesystem cannot tell; read it all
                    return
                raise SourceError(f"{self.path}: cannot map holes: {exc.strerror}") from None
            if data >= end:
                return
            hole = min(os.lseek(self._fd, data, os.SEEK_HOLE), end)
            if hole > data:
                yield data, hole - data
            pos = hole

    def read(self, offset: int, length: int) -> bytes:
        file_part = max(0, min(length, self._file_size - offset))
        data = pread_exact(self._fd, file_part, offset, self.path) if file_part else b""
        if file_part < length:
            data += bytes(length - file_part)
        return data

    def read_sequence(self, ranges: Iterable[Extent]) -> Iterator[bytes]:
        with SequentialReader(self._fd, ranges) as reader:
            try:
                for offset, length, data in reader:
                    file_part = max(0, min(length, self._file_size - offset))
                    if len(data) < file_part:
                        raise SourceError(
                            f"{self.path}: file is truncated: needed {file_part} bytes "
                            f"at offset {offset}, got {len(data)}"
                        )
                    if file_part < length:  # the padding to whole sectors
                        data = data[:file_part] + bytes(length - file_part)
                    yield data
            except OSError as exc:
                at = getattr(exc, "read_offset", 0)
                raise SourceError(
                    f"{self.path}: read error at offset {at}: {exc.strerror}"
                ) from exc

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
