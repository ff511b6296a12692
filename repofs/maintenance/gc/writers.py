"""Which writers (ingests, lease holders) are still running, and dropping those that are not.

gc deletes nothing a running writer may still use; the reservations and
leases in the index, with their pid and gc generation, say who that is.
"""

from __future__ import annotations

import os

import lmdb

from repofs.store.index import Index
from repofs.store.schema import decode_writer


def _oldest_writer(index: Index, txn: lmdb.Transaction) -> int:
    """The oldest gc generation a running ingest or lease holder started in (huge if none)."""
    oldest = 1 << 63
    for db in ("reservations", "leases"):
        for _key, value in index.items(txn, db):
            try:
                doc = decode_writer(value)
                pid, gen = int(doc["pid"]), int(doc.get("gen", 0))
            except (ValueError, KeyError, TypeError):
                continue
            if _alive(pid):
                oldest = min(oldest, gen)
    return oldest


def _drop_stale_writers(index: Index, txn: lmdb.Transaction) -> int:
    """Reservations and leases of writers whose process is gone."""
    dropped = 0
    for db in ("reservations", "leases"):
        stale = []
        for key, value in index.items(txn, db):
            try:
                pid = int(decode_writer(value)["pid"])
            except (ValueError, KeyError, TypeError):
                stale.append(key)
                continue
            if not _alive(pid):
                stale.append(key)
        for key in stale:
            index.delete(txn, db, key)
        dropped += len(stale) if db == "reservations" else 0
    return dropped


def _running(reservation: bytes) -> bool:
    """Whether the ingest that holds this reservation is still running."""
    try:
        return _alive(int(decode_writer(reservation)["pid"]))
    except (ValueError, KeyError, TypeError):
        return False


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
