"""Changed-block lists: which byte ranges of a disk changed since its parent.

An incremental ingest reads only the chunks a changed-block list names and
takes every other chunk reference from the parent restore point.  A wrong
list therefore produces a restore point with stale data that nothing else
would notice, so this module is strict about its input: every malformed or
doubtful list is a one-line :class:`~repofs.errors.SourceError`, never a
guess.

Three sources are understood (see ``docs/cbt.md``):

* the repofs JSON format, for custom integrations;
* VMware vSphere ``QueryChangedDiskAreas`` results saved as JSON;
* persistent qemu dirty bitmaps (``qemu-bitmap:NAME``), read with qemu's own
  tools from a qcow2 image or a running NBD export.

Lists are kept as two ``array('q')`` columns of extent starts and ends, not
as Python objects per extent, and every operation walks extents, never bytes
or chunks: a 2 TiB disk with a million extents costs 16 MB and well under a
second per pass.
"""

from __future__ import annotations

from array import array
from bisect import bisect_right
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, overload

from ingest.formats.source import Extent
from repofs.errors import SourceError

if TYPE_CHECKING:
    import random

#: Prefix of a ``--cbt`` spec that names a persistent qemu dirty bitmap.
QEMU_BITMAP_PREFIX = "qemu-bitmap:"


def _check_chunk_size(chunk_size: int, what: str = "chunk size") -> None:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0:
        raise ValueError(f"{what} must be a positive integer, not {chunk_size!r}")


class ExtentView(Sequence[Extent]):
    """Read-only ``(offset, length)`` view of a :class:`ChangedBlocks`' columns.

    It exists so callers can index, slice-free iterate and compare the extent
    list like a ``list`` without the list of a million tuples ever being built.
    """

    __slots__ = ("_ends", "_starts")

    def __init__(self, starts: array[int], ends: array[int]) -> None:
        self._starts = starts
        self._ends = ends

    def __len__(self) -> int:
        return len(self._starts)

    @overload
    def __getitem__(self, index: int) -> Extent: ...

    @overload
    def __getitem__(self, index: slice) -> list[Extent]: ...

    def __getitem__(self, index: int | slice) -> Extent | list[Extent]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        start = self._starts[index]
        return start, self._ends[index] - start

    def __iter__(self) -> Iterator[Extent]:
        for start, end in zip(self._starts, self._ends, strict=True):
            yield start, end - start

    def __eq__(self, other: object) -> bool:
        if isinstance(other, ExtentView):
            return self._starts == other._starts and self._ends == other._ends
        if isinstance(other, Sequence) and not isinstance(other, str | bytes):
            if len(other) != len(self):
                return False
            try:
                return all(tuple(a) == b for a, b in zip(other, self, strict=True))
            except TypeError:  # items that are not pairs
                return False
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]  # mutable-looking, like list

    def __repr__(self) -> str:
        if len(self) > 8:
            head = ", ".join(repr(e) for e in self[:4])
            return f"<{len(self)} extents: [{head}, ...]>"
        return repr(list(self))


def _merge_sorted(ranges: Iterable[tuple[int, int]]) -> tuple[array[int], array[int]]:
    """Merge ``(start, end)`` ranges sorted by start, touching ones too, into two columns."""
    starts: array[int] = array("q")
    ends: array[int] = array("q")
    cur_start = cur_end = -1
    for start, end in ranges:
        if start <= cur_end:
            cur_end = max(cur_end, end)
            continue
        if cur_end > cur_start:
            starts.append(cur_start)
            ends.append(cur_end)
        cur_start, cur_end = start, end
    if cur_end > cur_start:
        starts.append(cur_start)
        ends.append(cur_end)
    return starts, ends


class ChangedBlocks:
    """The byte ranges of one disk that may have changed since its parent.

    ``capacity`` is the disk size the list was validated against; every
    extent lies inside ``[0, capacity)``.  Extents are kept sorted, merged
    and non-empty, so two lists marking the same bytes compare equal whatever
    order or overlap their source used.  ``granularity`` is the unit the
    source tracked changes in (bitmap granularity, JSON ``block_size``, or 1
    when the source reports exact byte ranges); it is informational and does
    not take part in equality.  ``origin`` says where the list came from, for
    the restore point record and for messages.  ``base`` is the changed-block
    tracking position the list starts from (the repofs JSON ``base``), if it
    says; ingest refuses a list whose base is not the parent's position.
    """

    __slots__ = (
        "_changed_bytes",
        "_ends",
        "_starts",
        "base",
        "capacity",
        "granularity",
        "origin",
    )

    capacity: int
    granularity: int
    origin: str
    base: str | None

    def __init__(
        self,
        capacity: int,
        extents: Iterable[Extent] = (),
        *,
        granularity: int = 1,
        origin: str = "",
        base: str | None = None,
    ) -> None:
        """Build a list from ``extents`` in any order, possibly overlapping.

        Raises :class:`ValueError` for extents outside the disk or with a
        non-positive length: loaders validate user input first and raise
        :class:`SourceError` naming the file, so reaching this is a bug.
        """
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 0:
            raise ValueError(f"capacity must be a non-negative integer, not {capacity!r}")
        _check_chunk_size(granularity, "granularity")

        def checked() -> Iterator[tuple[int, int]]:
            for off, length in sorted(extents):
                if length <= 0 or off < 0 or off + length > capacity:
                    raise ValueError(
                        f"extent ({off}, {length}) is empty or outside a disk of {capacity} bytes"
                    )
                yield off, off + length

        starts, ends = _merge_sorted(checked())
        self._init(capacity, starts, ends, granularity, origin)
        self.base = base

    def _init(
        self, capacity: int, starts: array[int], ends: array[int], granularity: int, origin: str
    ) -> None:
        self.capacity = capacity
        self.granularity = granularity
        self.origin = origin
        self.base = None
        self._starts = starts
        self._ends = ends
        self._changed_bytes = sum(ends) - sum(starts)

    @classmethod
    def _from_columns(
        cls, capacity: int, starts: array[int], ends: array[int], granularity: int, origin: str
    ) -> ChangedBlocks:
        """Wrap columns that are already sorted, merged and in range (no re-sort)."""
        obj = cls.__new__(cls)
        obj._init(capacity, starts, ends, granularity, origin)
        return obj

    @classmethod
    def from_chunk_ranges(
        cls, capacity: int, ranges: Iterable[tuple[int, int]], chunk_size: int, origin: str = ""
    ) -> ChangedBlocks:
        """The list marking the chunks of ``(first, stop)`` index ranges, in any order.

        It is how an ingest states what it will read (the list's chunks and
        those a grown disk forces), so ``--cbt-check`` samples the chunks
        really taken from the parent with :func:`sample_unchanged_chunks`.
        """
        _check_chunk_size(chunk_size)
        starts, ends = _merge_sorted(
            sorted(
                (first * chunk_size, min(capacity, stop * chunk_size))
                for first, stop in ranges
                if first * chunk_size < capacity and stop > first
            )
        )
        return cls._from_columns(capacity, starts, ends, chunk_size, origin)

    # -- the list itself -------------------------------------------------

    @property
    def extents(self) -> ExtentView:
        """Sorted, merged ``(offset, length)`` extents, as a read-only sequence."""
        return ExtentView(self._starts, self._ends)

    def __iter__(self) -> Iterator[Extent]:
        return iter(self.extents)

    def __len__(self) -> int:
        """Number of extents (not bytes: see :attr:`changed_bytes`)."""
        return len(self._starts)

    @property
    def changed_bytes(self) -> int:
        """Total bytes the list marks as changed, before any rounding to chunks."""
        return self._changed_bytes

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ChangedBlocks):
            return NotImplemented
        return (
            self.capacity == other.capacity
            and self._starts == other._starts
            and self._ends == other._ends
        )

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        origin = f" from {self.origin}" if self.origin else ""
        return (
            f"<ChangedBlocks{origin}: {len(self)} extents, {self.changed_bytes} of "
            f"{self.capacity} bytes>"
        )

    # -- chunk arithmetic ------------------------------------------------

    def chunk_count(self, chunk_size: int) -> int:
        """Number of chunks of ``chunk_size`` the disk has (the last may be partial)."""
        _check_chunk_size(chunk_size)
        return -(-self.capacity // chunk_size)

    def round_out(self, chunk_size: int) -> ChangedBlocks:
        """Return the list widened to whole chunks, clipped to the capacity.

        A chunk is the unit ingest hashes and stores, so a change to any byte
        of it means the whole chunk must be read again.  Every extent of the
        result starts on a chunk boundary and ends on one or at the capacity
        (the disk's last chunk may be partial); neighbours that meet after
        widening are merged.
        """
        _check_chunk_size(chunk_size)
        capacity = self.capacity
        starts, ends = _merge_sorted(
            (start - start % chunk_size, min(capacity, -(-end // chunk_size) * chunk_size))
            for start, end in zip(self._starts, self._ends, strict=True)
        )
        out = ChangedBlocks._from_columns(capacity, starts, ends, chunk_size, self.origin)
        out.base = self.base
        return out

    def chunk_ranges(self, chunk_size: int) -> Iterator[tuple[int, int]]:
        """Yield merged ``(first, stop)`` half-open ranges of changed chunk indexes.

        This is the compact form of :meth:`chunk_indexes`: one pair per run of
        consecutive changed chunks, so a fully changed 2 TiB disk is one pair.
        """
        _check_chunk_size(chunk_size)
        cur_first = cur_stop = -1
        for start, end in zip(self._starts, self._ends, strict=True):
            first = start // chunk_size
            stop = -(-end // chunk_size)
            if first <= cur_stop:
                cur_stop = max(cur_stop, stop)
                continue
            if cur_stop > cur_first:
                yield cur_first, cur_stop
            cur_first, cur_stop = first, stop
        if cur_stop > cur_first:
            yield cur_first, cur_stop

    def chunk_indexes(self, chunk_size: int) -> Iterator[int]:
        """Yield, in order, the index of every chunk holding at least one changed byte."""
        for first, stop in self.chunk_ranges(chunk_size):
            yield from range(first, stop)

    def changed_chunks(self, chunk_size: int) -> int:
        """Count the chunks :meth:`chunk_indexes` would yield, without yielding them."""
        return sum(stop - first for first, stop in self.chunk_ranges(chunk_size))

    def contains_chunk(self, index: int, chunk_size: int) -> bool:
        """Whether chunk ``index`` holds at least one changed byte (a binary search)."""
        nchunks = self.chunk_count(chunk_size)
        if not 0 <= index < nchunks:
            raise IndexError(f"chunk {index} is outside a disk of {nchunks} chunks")
        chunk_start = index * chunk_size
        chunk_end = min(self.capacity, chunk_start + chunk_size)
        i = bisect_right(self._ends, chunk_start)
        return i < len(self._starts) and self._starts[i] < chunk_end

    def unchanged_chunk_ranges(self, chunk_size: int) -> Iterator[tuple[int, int]]:
        """Yield ``(first, stop)`` ranges of chunk indexes holding no changed byte."""
        nchunks = self.chunk_count(chunk_size)
        prev = 0
        for first, stop in self.chunk_ranges(chunk_size):
            if first > prev:
                yield prev, first
            prev = stop
        if nchunks > prev:
            yield prev, nchunks


def sample_unchanged_chunks(
    changed: ChangedBlocks, chunk_size: int, capacity: int, n: int, rng: random.Random
) -> list[int]:
    """Pick up to ``n`` distinct chunk indexes the list says are unchanged.

    ``--cbt-check N`` reads these chunks from the source and compares them
    with the parent restore point: a mismatch means the changed-block list
    missed a change (a reset or broken tracker), which would otherwise go
    unnoticed forever.  The choice is uniform over all unchanged chunks and
    without replacement; it draws ranks in ``[0, unchanged)`` and maps them
    onto the gaps between changed runs, so it never builds the list of
    unchanged chunks.  Fewer than ``n`` come back only when fewer exist.
    The result is sorted, so the check reads the source front to back.

    ``capacity`` must equal ``changed.capacity``: a caller passing the size
    of a different disk is a bug, reported as :class:`ValueError`.
    """
    if capacity != changed.capacity:
        raise ValueError(f"changed-block list is for {changed.capacity} bytes, not {capacity}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"sample size must be a non-negative integer, not {n!r}")
    total = changed.chunk_count(chunk_size) - changed.changed_chunks(chunk_size)
    k = min(n, total)
    if k == 0:
        return []
    ranks = sorted(rng.sample(range(total), k))
    picked: list[int] = []
    gap_iter = changed.unchanged_chunk_ranges(chunk_size)
    first, stop = next(gap_iter)
    base = 0  # rank of ``first``
    for rank in ranks:
        while rank >= base + (stop - first):
            base += stop - first
            first, stop = next(gap_iter)
        picked.append(first + (rank - base))
    return picked


#: Longest changed-block tracking position (``--cbt-position``, ``--cbt-base``, JSON
#: ``base``): a VMware changeId is about 55 characters, a qemu bitmap name at most 1023
#: bytes but in practice a short name.
MAX_CBT_ID = 256


def cbt_id_problem(value: object) -> str | None:
    """What is wrong with ``value`` as a changed-block tracking position, or None.

    Positions are compared as exact strings, so the rules keep out what
    would make two spellings of one position differ unseen or break a
    one-line message: control characters and whitespace at either end.
    """
    if not isinstance(value, str):
        return f"must be a string, not {type(value).__name__}"
    if not value:
        return "is empty"
    if len(value) > MAX_CBT_ID:
        return f"is longer than {MAX_CBT_ID} characters"
    if not value.isprintable():
        return "holds a control character"
    if value != value.strip():
        return "begins or ends with whitespace"
    return None


def check_base(
    disk: str, base: str | None, *, implied: bool, parent_id: str, position: str | None
) -> str | None:
    """Refuse a list that does not start where the parent was taken; return a warning or None.

    ``base`` is where the list says it starts (``--cbt-base``, the JSON
    ``base``, or ``implied`` by a qemu bitmap's name), ``position`` what the
    parent recorded for the disk.  A different base means a backup was
    skipped (the list misses the changes before it) or repeated (it starts
    before the parent): either would store stale data silently.  An implied
    base is only checked against a recorded position, so scripts that never
    record positions go on as before.  A list without a base, against a
    parent that recorded a position, is taken with a warning for the same
    reason.
    """
    if base is None or (implied and position is None):
        if position is None:
            return None
        return (
            f"disk {disk}: the changed-block list names no base, so it is not checked against "
            f"parent {parent_id}'s changed-block position {position!r} (give --cbt-base)"
        )
    if position is None:
        raise SourceError(
            f"disk {disk}: the changed-block list starts at {base!r}, but parent {parent_id} "
            "recorded no changed-block position; take a full backup or give the list that "
            "starts where the parent was taken"
        )
    if base != position:
        raise SourceError(
            f"disk {disk}: the changed-block list starts at {base!r}, but parent {parent_id} "
            f"was taken at {position!r}: a backup was skipped or repeated; nothing written"
        )
    return None
