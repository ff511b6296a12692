"""Reading a pack without the index: record by record, resynchronising past damage.

This is the view ``rebuild-index`` has of a repository, and the one
``verify`` falls back to when the index itself is unusable.  A record is
trusted only when its header checksum holds (then its lengths are right and
the next record starts where it ends); anywhere else the scan looks for the
next record magic and reports the bytes in between as damaged.  Payloads
are checked against their digests separately, in worker threads, because
that is where the time goes.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

from repofs.errors import IntegrityError
from repofs.store.crypto import PLAIN, Keys
from repofs.store.packstore import LocalPackStore
from repofs.store.records import (
    PACK_HEADER,
    PACK_MAGIC,
    PACK_VERSION,
    RECORD_HEADER_SIZE,
    RECORD_MAGIC,
    RecordHeader,
    RecordType,
    decode_header,
    decode_payload,
)
from repofs.store.rprecords import parse_rp_record


@dataclass(frozen=True, slots=True)
class ScannedRecord:
    header: RecordHeader
    offset: int  #: of the record header, as the index stores it
    payload: memoryview


@dataclass(frozen=True, slots=True)
class DamagedArea:
    offset: int
    length: int
    reason: str


@dataclass
class PackScan:
    """What one pack file holds, as far as its own bytes tell."""

    pack_id: bytes
    size: int
    records: list[ScannedRecord] = field(default_factory=list)
    damaged: list[DamagedArea] = field(default_factory=list)
    #: Why the whole pack was left out (another repository's, unreadable), else None.
    skipped: str | None = None

    def _damage(self, offset: int, length: int, reason: str) -> None:
        last = self.damaged[-1] if self.damaged else None
        if last is not None and last.offset + last.length == offset:
            self.damaged[-1] = DamagedArea(last.offset, last.length + length, last.reason)
        else:
            self.damaged.append(DamagedArea(offset, length, reason))


def parse_pack(data: bytes, pack_id: bytes, repository_id: str) -> PackScan:
    """Split a pack's bytes into records whose headers check out, and damaged areas."""
    scan = PackScan(pack_id, len(data))
    if len(data) >= PACK_HEADER.size:
        magic, version, repo = PACK_HEADER.unpack_from(data)
        if repo.hex() != repository_id:
            if magic == PACK_MAGIC and version == PACK_VERSION:
                scan.skipped = f"belongs to repository {repo.hex()}, not this one"
            else:
                scan.skipped = "has no valid pack header"
            return scan
        if magic != PACK_MAGIC or version != PACK_VERSION:
            scan._damage(0, PACK_HEADER.size, "damaged pack header")
    else:
        scan.skipped = f"is shorter than its {PACK_HEADER.size}-byte header"
        return scan
    view = memoryview(data)
    pos, end = PACK_HEADER.size, len(data)
    while pos < end:
        reason = "truncated record header at the end of the pack"
        if pos + RECORD_HEADER_SIZE <= end:
            try:
                hdr = decode_header(view[pos : pos + RECORD_HEADER_SIZE], "scan")
            except IntegrityError as exc:
                reason = str(exc).removeprefix("scan: ")
            else:
                stop = pos + RECORD_HEADER_SIZE + hdr.stored_len
                if stop <= end:
                    payload = view[pos + RECORD_HEADER_SIZE : stop]
                    scan.records.append(ScannedRecord(hdr, pos, payload))
                    pos = stop
                    continue
                reason = "record runs past the end of the pack (truncated)"
        nxt = data.find(RECORD_MAGIC, pos + 1)
        nxt = end if nxt < 0 else nxt
        scan._damage(pos, nxt - pos, reason)
        pos = nxt
    return scan


def scan_pack(store: LocalPackStore, pack_id: bytes, repository_id: str) -> PackScan:
    """Read a whole pack (packs are bounded by the pack target size) and parse it."""
    try:
        size = store.size(pack_id)
        data = store.read(pack_id, 0, size)
    except IntegrityError as exc:
        scan = PackScan(pack_id, 0)
        scan.skipped = f"cannot be read: {exc}"
        return scan
    return parse_pack(data, pack_id, repository_id)


Checked = tuple[ScannedRecord, bytes | None, str | None]


def check_payloads(
    scan: PackScan,
    pool: Executor,
    keep: frozenset[RecordType] = frozenset(),
    batch: int = 64,
    keys: Keys = PLAIN,
) -> Iterator[Checked]:
    """Yield ``(record, content or None, None)`` or ``(record, None, error)`` in pack order.

    The content is kept only for record types in ``keep`` (restore points
    and tombstones, which the caller parses), so memory stays at about one
    pack.  Decompression and hashing run in ``pool``, in batches of records.
    """

    def work(recs: list[ScannedRecord]) -> list[Checked]:
        out: list[Checked] = []
        for r in recs:
            where = f"pack {scan.pack_id.hex()} offset {r.offset}"
            try:
                raw = decode_payload(r.header, r.payload, where, keys)
            except IntegrityError as exc:
                out.append((r, None, str(exc)))
            else:
                out.append((r, raw if r.header.type in keep else None, None))
        return out

    recs = scan.records
    futures = [pool.submit(work, recs[i : i + batch]) for i in range(0, len(recs), batch)]
    for fut in futures:
        yield from fut.result()


def restore_point_records(
    store: LocalPackStore, pack_id: bytes, repository_id: str, keys: Keys = PLAIN
) -> list[tuple[bytes, dict[str, Any]]]:
    """``(digest, restore point)`` of every readable restore point record in one pack.

    How gc and verify look into packs the index does not know: a restore
    point record there means the index is older than the packs (a restored
    copy, a lost transaction), and the packs must not be collected as
    leftovers before rebuild-index has read them.
    """
    out = []
    for rec in scan_pack(store, pack_id, repository_id).records:
        if rec.header.type != RecordType.RESTORE_POINT:
            continue
        where = f"pack {pack_id.hex()} offset {rec.offset}"
        try:
            doc = parse_rp_record(decode_payload(rec.header, bytes(rec.payload), where, keys))
        except IntegrityError:
            continue  # unreadable: rebuild-index could not bring it back either
        if doc is not None:
            out.append((rec.header.digest, doc))
    return out
