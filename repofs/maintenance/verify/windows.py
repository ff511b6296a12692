"""The objects verify re-reads, and their cut into large sequential reads of each pack.

verify reads every pack once, front to back: objects are sorted by pack and
offset and grouped into windows of up to ``WINDOW`` bytes that read through
small holes rather than seek.  The planning is apart from the reading
(:mod:`.packreader`) and the checking (:mod:`.recordcheck`), which both
consume windows, and from the benchmark, which plans the same windows.
"""

from __future__ import annotations

import mmap
from dataclasses import dataclass
from typing import NamedTuple

from repofs.store.records import RECORD_HEADER_SIZE
from repofs.util.directio import ALIGN

WINDOW = 8 * 1024 * 1024  # one sequential read
STORE_WINDOW = 16 * 1024 * 1024  # one ranged GET of a bucket's pack: a few per pack
GAP = 1024 * 1024  # read through holes smaller than this rather than seek


class _Entry(NamedTuple):
    """One object to re-read.  A tuple, so that sorting by pack and offset runs in C."""

    pack_id: bytes
    offset: int
    stored_len: int
    raw_len: int
    rtype: int  # a RecordType; kept a plain int in the hot loop
    digest: bytes


@dataclass(slots=True)
class _Window:
    """One sequential read: block-aligned ``start``, and the records lying wholly inside it."""

    pack_id: bytes
    start: int
    length: int
    entries: list[_Entry]
    nbytes: int  # record bytes in it, for the counters and the progress line


_Buffer = mmap.mmap | bytes  # what a window is read into
#: the failures of one window, ``(entry, message)``; records that checked out are not listed
_Failures = list[tuple[_Entry, str]]


def plan_windows(work: list[_Entry], window: int = WINDOW) -> list[_Window]:
    """Cut ``work`` (sorted by pack, offset) into reads of at most ``window`` bytes.

    A window holds whole records only and reads through holes under
    ``GAP``, where seeking would cost more than reading.  Its start is
    rounded down to a block boundary so that it can be read with
    ``O_DIRECT``; neighbouring windows may share that one block.
    """
    out: list[_Window] = []
    i, n = 0, len(work)
    while i < n:
        first = work[i]
        pack, begin = first.pack_id, first.offset
        start = begin - begin % ALIGN
        end = begin + RECORD_HEADER_SIZE + first.stored_len
        nbytes = end - begin
        j = i + 1
        while j < n:
            e = work[j]
            e_end = e.offset + RECORD_HEADER_SIZE + e.stored_len
            if e.pack_id != pack or e.offset - end > GAP or e_end - start > window:
                break
            end = max(end, e_end)
            nbytes += e_end - e.offset
            j += 1
        out.append(_Window(pack, start, end - start, work[i:j], nbytes))
        i = j
    return out
