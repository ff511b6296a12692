"""The interface every disk-image reader implements.

The ingest pipeline only ever sees a :class:`DiskSource`: a virtual disk of a
fixed capacity, addressed by byte offset, that can say which ranges may hold
data.  Ranges outside :meth:`DiskSource.allocated_extents` are known to read
as zeros and are never read, which is what makes a 1 TiB thin disk with
1 GiB allocated cost about as much as 1 GiB of data.
"""

from __future__ import annotations

import abc
from collections.abc import Iterable, Iterator
from types import TracebackType

from ingest.plan import intersect
from repofs.errors import SourceError

Extent = tuple[int, int]
"""An ``(offset, length)`` byte range of the virtual disk."""


class DiskSource(abc.ABC):
    """A virtual disk to ingest.

    Implementations must be safe to call :meth:`read` on from one thread at a
    time (the pipeline reads sequentially from a single reader thread) and
    must raise :class:`SourceError` naming the file for every malformed
    structure they meet, never another exception type.
    """

    #: Path given by the user, used in every error message.
    path: str
    #: Short format name recorded in the restore point, e.g. ``raw``,
    #: ``vmdk:monolithicSparse``, ``qcow2``, ``vhdx``.
    format_name: str

    @property
    @abc.abstractmethod
    def size(self) -> int:
        """Virtual capacity in bytes."""

    @abc.abstractmethod
    def allocated_extents(self) -> Iterator[Extent]:
        """Yield sorted, non-overlapping ranges that may hold non-zero data.

        Everything outside them reads as zeros.  A reader that cannot tell
        yields ``(0, size)``.  Adjacent ranges may or may not be merged.
        """

    def allocated_within(self, ranges: Iterable[Extent]) -> Iterator[Extent]:
        """:meth:`allocated_extents` clipped to ``ranges`` (sorted, non-overlapping).

        An incremental with a changed-block list reads only the changed
        ranges, so only their allocation matters.  Readers that can look a
        range up directly override this, and then planning an incremental
        costs O(changes), not O(allocated extents): a fragmented 2 TiB disk
        has tens of thousands of those.
        """
        mine = [(off, off + n) for off, n in self.allocated_extents()]
        wanted = [(off, off + n) for off, n in ranges]
        for lo, hi in intersect(mine, wanted):
            yield lo, hi - lo

    @abc.abstractmethod
    def read(self, offset: int, length: int) -> bytes:
        """Return exactly ``length`` bytes of the virtual disk at ``offset``.

        ``offset + length`` never exceeds :attr:`size`.  Unallocated ranges
        read as zeros.  A short read of the underlying file is a
        :class:`SourceError`, never silently padded.
        """

    def read_sequence(self, ranges: Iterable[Extent]) -> Iterator[bytes]:
        """Yield :meth:`read` of each range in order; readers of plain files read ahead.

        Ingest knows every range it will read before it starts, so a reader
        may fetch the next ones while the pipeline hashes and compresses.
        """
        for offset, length in ranges:
            yield self.read(offset, length)

    def chain(self) -> list[str]:
        """Files this source reads, child first (for the restore point record)."""
        return [self.path]

    def close(self) -> None:  # noqa: B027 - optional hook, most readers hold one fd
        """Release file descriptors."""

    def __enter__(self) -> DiskSource:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def clip_extents(extents: Iterator[Extent], size: int) -> Iterator[Extent]:
    """Clip ranges to ``[0, size)`` and merge touching neighbours."""
    cur_start = cur_end = -1
    for off, length in extents:
        if length <= 0:
            continue
        start, end = max(0, off), min(size, off + length)
        if start >= end:
            continue
        if start < cur_start:
            raise SourceError(f"allocation map is not sorted at offset {start}")
        if start <= cur_end:
            cur_end = max(cur_end, end)
            continue
        if cur_end > cur_start:
            yield cur_start, cur_end - cur_start
        cur_start, cur_end = start, end
    if cur_end > cur_start:
        yield cur_start, cur_end - cur_start


def pread_exact(fd: int, length: int, offset: int, path: str) -> bytes:
    """Read exactly ``length`` bytes or raise :class:`SourceError` naming ``path``."""
    import os

    parts = []
    got = 0
    while got < length:
        try:
            data = os.pread(fd, length - got, offset + got)
        except OSError as exc:
            raise SourceError(
                f"{path}: read error at offset {offset + got}: {exc.strerror}"
            ) from exc
        if not data:
            raise SourceError(
                f"{path}: file is truncated: needed {length} bytes at offset {offset}, got {got}"
            )
        parts.append(data)
        got += len(data)
    return parts[0] if len(parts) == 1 else b"".join(parts)
