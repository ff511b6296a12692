"""The record types that describe restore points themselves: their own record, tombstones, flags.

A restore point's record (``RESTORE_POINT``) is its JSON as committed, so
``rebuild-index`` can find it without the index.  Its digest follows from
the index's copy of the JSON (the ``record`` hint set to ``None``), which is
how ``gc`` and ``verify`` find the record without trusting the hint: gc may
move the record to another pack.

A ``TOMBSTONE`` names a restore point that ``prune`` removed (or that gc
found never committed).  It is written and made durable before the restore
point leaves the index, so a later ``rebuild-index`` does not bring it back.
Tombstones are tiny and gc keeps them forever.

A ``PROTECTION`` record (format 2) sets or clears a restore point's
protected flag, which is the one thing about a restore point that changes:
its own record is immutable.  Each carries a sequence number from the
index's counter; the highest one for a restore point is its flag, which
the index copies into the restore point's JSON (``protected``,
``protected_seq``) and ``rebuild-index`` restores from the packs.  gc keeps
them forever, like tombstones.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from repofs.store.crypto import PLAIN, Keys

#: Keys of the index's copy of a restore point that its own record never holds.
INDEX_ONLY = frozenset({"record", "protected", "protected_seq"})


def rp_record_body(doc: dict[str, Any]) -> bytes:
    """The exact bytes ``Repository.commit`` wrote for a restore point with this index document."""
    body = {k: v for k, v in doc.items() if k not in INDEX_ONLY}
    body["record"] = None
    return json.dumps(body, sort_keys=True).encode()


def rp_record_digest(doc: dict[str, Any], keys: Keys = PLAIN) -> bytes:
    """The name of the record written for ``doc`` (keyed in an encrypted repository)."""
    return keys.name(rp_record_body(doc))


@dataclass(frozen=True)
class _AboutRestorePoint:
    """What tombstones and protection records share: the restore point they are about."""

    vm: str
    id: str
    seq: int  #: the restore point's sequence number: a later one of the same id is another

    @property
    def target(self) -> tuple[str, str, int]:
        return self.vm, self.id, self.seq

    def _body(self, **fields: Any) -> bytes:
        doc = {"vm": self.vm, "id": self.id, "seq": self.seq, **fields}
        return json.dumps(doc, sort_keys=True).encode()


@dataclass(frozen=True)
class Tombstone(_AboutRestorePoint):
    vm_seq: int | None = None  #: lets rebuild-index keep the VM directory's inode number

    def body(self) -> bytes:
        return self._body(vm_seq=self.vm_seq, removed=time.time())


@dataclass(frozen=True)
class Protection(_AboutRestorePoint):
    """A restore point's protected flag as set at one moment; the highest ``flag_seq`` wins."""

    flag_seq: int
    protected: bool

    def body(self) -> bytes:
        return self._body(flag_seq=self.flag_seq, protected=self.protected, set=time.time())


def parse_protection(raw: bytes) -> Protection | None:
    """A protection record from its content, or None if it is not one we can trust."""
    try:
        doc = json.loads(raw)
        fields = doc["vm"], doc["id"], doc["seq"], doc["flag_seq"], doc["protected"]
    except (ValueError, KeyError, TypeError):
        return None
    vm, rp_id, seq, flag_seq, protected = fields
    types = (str, str, int, int, bool)
    if not all(isinstance(v, t) for v, t in zip(fields, types, strict=True)):
        return None
    if isinstance(seq, bool) or isinstance(flag_seq, bool):
        return None
    return Protection(vm, rp_id, seq, flag_seq, protected)


def latest_protections(flags: list[Protection]) -> dict[tuple[str, str, int], Protection]:
    """Per restore point, the protection record with the highest sequence number."""
    out: dict[tuple[str, str, int], Protection] = {}
    for f in flags:
        have = out.get(f.target)
        if have is None or have.flag_seq < f.flag_seq:
            out[f.target] = f
    return out


def parse_tombstone(raw: bytes) -> Tombstone | None:
    """A tombstone from its record content, or None if it is not one we can trust."""
    try:
        doc = json.loads(raw)
        vm, rp_id, seq = doc["vm"], doc["id"], doc["seq"]
        vm_seq = doc.get("vm_seq")
    except (ValueError, KeyError, TypeError):
        return None
    if not (isinstance(vm, str) and isinstance(rp_id, str) and isinstance(seq, int)):
        return None
    return Tombstone(vm, rp_id, seq, vm_seq if isinstance(vm_seq, int) else None)


def parse_rp_record(raw: bytes) -> dict[str, Any] | None:
    """A restore point's JSON from its record content, or None if it is malformed."""
    try:
        doc = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(doc, dict):
        return None
    ok = (
        isinstance(doc.get("vm"), str)
        and isinstance(doc.get("id"), str)
        and isinstance(doc.get("seq"), int)
        and isinstance(doc.get("vm_seq"), int)
        and isinstance(doc.get("disks"), list)
    )
    return doc if ok else None
