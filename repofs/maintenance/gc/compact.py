"""gc's plan and copy: live bytes per pack, and the live records of sparse packs copied out.

Step 2 of gc (see :mod:`repofs.maintenance.gc`): a pack below the threshold
has its live records copied, verbatim and verified, into new packs, so that
the sweep can condemn it whole.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import lmdb

from repofs.errors import IntegrityError, NoSpaceError
from repofs.maintenance.gc.common import _KEPT, GcResult, _pause
from repofs.maintenance.gc.mark import Marker
from repofs.store.crypto import Keys
from repofs.store.packstore import PackStore
from repofs.store.records import (
    RECORD_HEADER_SIZE,
    Codec,
    RecordType,
    decode_header,
    decode_payload,
)
from repofs.store.repository import Repository
from repofs.store.rprecords import rp_record_digest
from repofs.store.schema import (
    Location,
    decode_location,
    decode_pack_info,
    key_digest,
    key_type,
    object_key,
)


@dataclass
class _PackUse:
    size: int
    live_bytes: int = 0
    live: list[tuple[bytes, Location]] = field(default_factory=list)


def _scan(repo: Repository, live: set[bytes]) -> tuple[dict[bytes, _PackUse], list[bytes]]:
    """Live bytes and live objects per pack; and live keys the index lacks."""
    index = repo.index

    def txn_fn(txn: lmdb.Transaction) -> tuple[dict[bytes, _PackUse], int]:
        uses = {k: _PackUse(decode_pack_info(v)[0]) for k, v in index.items(txn, "packs")}
        found = 0
        for key, value in index.items(txn, "objects"):
            in_live = key in live
            if not (in_live or key_type(key) in _KEPT):
                continue
            found += in_live
            loc = decode_location(value)
            use = uses.get(loc.pack_id)
            if use is not None:
                use.live_bytes += RECORD_HEADER_SIZE + loc.stored_len
                use.live.append((key, loc))
        return uses, found

    uses, found = index.read(txn_fn)
    missing: list[bytes] = []
    if found < len(live):
        with index.reading() as txn:
            missing = sorted(k for k in live if index.get(txn, "objects", k) is None)
    return uses, missing


def _copy(
    repo: Repository,
    uses: dict[bytes, _PackUse],
    sparse: set[bytes],
    marker: Marker,
    result: GcResult,
) -> set[bytes]:
    """Copy the live records of sparse packs into new packs; returns the packs fully copied.

    A source pack counts as copied only once every one of its records sits
    in a published new pack.  Running out of space ends copying early: the
    packs copied so far are still freed, and so are packs with nothing live.
    """
    writer = repo.writer()
    copied: set[bytes] = set()
    in_flight: list[bytes] = []
    moved_records: set[bytes] = set()
    try:
        for pack_id in sorted(sparse):
            try:
                records = _read_live(repo.packs, pack_id, uses[pack_id], repo.keys)
            except IntegrityError as exc:
                result.warnings.append(f"pack {pack_id.hex()} kept as it is: {exc}")
                continue
            published = len(writer.packs_published)
            for key, codec, raw_len, payload in records:
                writer.put(RecordType(key_type(key)), key_digest(key), codec, raw_len, payload)
                if key_type(key) == RecordType.RESTORE_POINT:
                    moved_records.add(key)
            if len(writer.packs_published) > published:  # everything put before this pack is out
                copied.update(in_flight)
                in_flight = []
            in_flight.append(pack_id)
            _pause()
        writer.flush()
        copied.update(in_flight)
    except NoSpaceError as exc:
        writer.abort()
        result.warnings.append(f"stopped rewriting packs: {exc}; freeing what is dead")
        # Only published packs were written; the aborted one is gone again.
        result.bytes_written += sum(repo.packs.size(p) for p in writer.packs_published)
    except BaseException:
        writer.abort()
        raise
    else:
        result.bytes_written += writer.bytes_stored
    if moved_records:
        _update_record_hints(repo, moved_records)
    return copied


def _read_live(
    store: PackStore, pack_id: bytes, use: _PackUse, keys: Keys
) -> list[tuple[bytes, Codec, int, bytes]]:
    """The live records of one pack, each verified before it is copied anywhere.

    A sealed record is copied as it is: its associated data binds the
    repository's content id, type and name, not the pack or offset.
    """
    data = memoryview(store.read(pack_id, 0, use.size))
    out = []
    for key, loc in sorted(use.live, key=lambda kl: kl[1].offset):
        where = f"pack {pack_id.hex()} offset {loc.offset}"
        end = loc.offset + RECORD_HEADER_SIZE + loc.stored_len
        hdr = decode_header(data[loc.offset : loc.offset + RECORD_HEADER_SIZE], where)
        if hdr.type != key_type(key) or hdr.digest != key_digest(key):
            raise IntegrityError(f"{where}: holds another object than the index says")
        payload = data[loc.offset + RECORD_HEADER_SIZE : end]
        decode_payload(hdr, payload, where, keys)
        out.append((key, hdr.codec, hdr.raw_len, bytes(payload)))
    return out


def _update_record_hints(repo: Repository, moved: set[bytes]) -> None:
    """Point the ``record`` hint of restore points at their moved records (informational only)."""
    index = repo.index

    def txn_fn(txn: lmdb.Transaction) -> None:
        for key, doc in list(index.rp_items(txn)):
            record = object_key(RecordType.RESTORE_POINT, rp_record_digest(doc, repo.keys))
            if record in moved:
                raw = index.get(txn, "objects", record)
                if raw is not None:
                    loc = decode_location(raw)
                    doc["record"] = [loc.pack_id.hex(), loc.offset]
                    index.put_rp_doc(txn, key, doc)

    index.write(txn_fn)
