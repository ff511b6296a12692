"""The bucket's log: the facts every host applies to its cache of the index.

A repository in a bucket has no index that all hosts share.  What it has is
a log of small immutable objects (:mod:`repofs.store.segment`): one commit
per restore point, and facts written by prune, delete, protect and gc.
Each host applies them to its own LMDB cache (the same tables a local
repository has).  Applying is idempotent and does not depend on the order:

* a digest found in two packs is located in the one with the smaller id,
  so every host picks the same;
* a buried restore point, a retired pack, a condemned pack stay so (the
  ``buried``, ``retired`` and ``doomed`` tables), whatever arrives later;
* a protection flag with a higher ``flag_seq`` wins.

So two hosts that listed the log at different moments converge once each
has applied what the other has.  Checkpoints are the same facts for the
whole repository in one object, naming the log objects they cover: a
fresh host applies the newest one and the few log objects after it,
instead of reading every pack (``docs/object-storage.md``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time
from collections.abc import Iterator
from typing import Any

import blake3

from repofs.errors import IntegrityError, RepofsError
from repofs.store.bucket import Bucket, ObjectInfo, ObjectMissing
from repofs.store.crypto import Keys
from repofs.store.index import Index
from repofs.store.names import rp_id_for, rp_id_seconds, validate_vm_name
from repofs.store.records import RecordType
from repofs.store.restorepoint import RestorePoint
from repofs.store.rprecords import parse_protection
from repofs.store.schema import (
    decode_condemned,
    decode_doomed,
    decode_location,
    decode_pack_info,
    decode_seq_target,
    encode_condemned,
    encode_doomed,
    encode_location,
    encode_pack_info,
    key_digest,
    key_type,
    object_key,
    seq_target_rp,
    seq_target_vm,
)
from repofs.store.segment import Entry, Segment

LOG_PREFIX = "log/"
CHECKPOINT_PREFIX = "checkpoints/"
CHECKPOINT_EVERY = 64  #: log objects past the newest checkpoint before a commit writes one
_SEQ_SPACE = (1 << 47) - 2
_LAST_SYNC_KEY = b"s3lastsync"
log = logging.getLogger("repofs.store.bucketlog")


def log_grace() -> float:
    """How old a log object covered by a checkpoint must be before gc removes it."""
    try:
        return max(1.0, float(os.environ.get("REPOFS_S3_LOG_GRACE", "")))
    except ValueError:
        return 3600.0


def hashed_seq(*parts: bytes) -> int:
    """A sequence number (an inode number's upper part) every host derives alike: 2 .. 2^47-1."""
    digest = blake3.blake3(b"\0".join((b"repofs seq", *parts))).digest()
    return int.from_bytes(digest[:8], "big") % _SEQ_SPACE + 2


def vm_seq_of(index: Index, vm: str) -> int:
    return hashed_seq(b"vm", index.names.vm_key(vm))


def rp_seq_of(index: Index, vm: str, rp_id: str) -> int:
    return hashed_seq(b"rp", index.rp_key(vm, rp_id))


def nonce_of(doc: dict[str, Any]) -> bytes:
    """What tells one commit of an id from another: its record's pack id (random, 16 bytes)."""
    record = doc.get("record")
    try:
        return bytes.fromhex(record[0])  # type: ignore[index]
    except (TypeError, ValueError, IndexError):
        return b"\0" * 16


class BucketLog:
    """Reads and writes the log of one repository and applies it to this host's cache."""

    def __init__(self, bucket: Bucket, keys: Keys, index: Index) -> None:
        self.bucket = bucket
        self.keys = keys
        self.index = index
        self._newest_checkpoint: ObjectInfo | None = None
        self._uncovered = 0
        self._warned: set[str] = set()
        #: (chunk size, page references) of the repository: restore points are checked
        #: against it as they are applied (None: types only).
        self.shape: tuple[int, int] | None = None

    # -- names -------------------------------------------------------------------

    def commit_name(self, vm: str, rp_id: str) -> str:
        """The one name a commit of (vm, id) can have: conditional writes make ids unique."""
        return LOG_PREFIX + "c-" + self.keys.name(b"commit\0" + self.index.rp_key(vm, rp_id)).hex()

    @staticmethod
    def fact_name() -> str:
        return f"{LOG_PREFIX}f-{time.time_ns():016x}-{os.urandom(16).hex()}"

    # -- writing -----------------------------------------------------------------

    def put_commit(self, seg: Segment, vm: str, rp_id: str) -> str | None:
        """Write the commit; its name, or None if another host committed this id first."""
        name = self.commit_name(vm, rp_id)
        data = seg.encode(self.keys, name)
        try:
            if not self.bucket.put(name, data, exclusive=True):
                return None
        except RepofsError:
            # The answer was lost after the last try: the store may have the commit all
            # the same, and then it is visible to every host. Reported as failed, the
            # ingest would be run again for a restore point that exists.
            with contextlib.suppress(RepofsError):
                if self.bucket.get(name) == data:
                    return name
            raise
        return name

    def put_facts(self, seg: Segment) -> str:
        """Write a facts object (prune, protect, gc); returns once the store has it."""
        name = self.fact_name()
        self.bucket.put(name, seg.encode(self.keys, name))
        return name

    def publish(self, seg: Segment, name: str | None = None) -> str:
        """Write facts and apply them here at once (this host must not wait for a sync)."""
        name = name or self.put_facts(seg)
        self.index.write(lambda txn: self.apply(txn, seg, name))
        return name

    # -- syncing -----------------------------------------------------------------

    def sync(self) -> int:
        """Apply what the bucket's log holds and this cache has not; the number applied."""
        for attempt in range(3):
            try:
                return self._sync(force_checkpoint=attempt > 0)
            except _Compacted:
                continue
        raise IntegrityError(
            f"{self.bucket.location.url}: log objects keep vanishing while this host reads "
            "them (gc compacting the log?); try again"
        )

    def _sync(self, *, force_checkpoint: bool) -> int:
        listed_at = time.time()
        checkpoints = sorted(self.bucket.list(CHECKPOINT_PREFIX), key=lambda i: i.name)
        logs = list(self.bucket.list(LOG_PREFIX))
        applied = self.index.read(
            lambda txn: {k.decode() for k, _ in self.index.items(txn, "applied")}
        )
        last_sync = self.index.read(lambda txn: self.index.get(txn, "meta", _LAST_SYNC_KEY))
        newest = checkpoints[-1] if checkpoints else None
        self._newest_checkpoint = newest
        todo = [i for i in logs if i.name not in applied]
        count = 0
        covered: set[str] = set()
        if newest is not None and newest.name not in applied:
            recent = (
                last_sync is not None
                and listed_at - float(last_sync.decode()) < log_grace() / 2
                and not todo
            )
            if recent and not force_checkpoint:
                # Every log object it covers is still listed and applied here: nothing new.
                self.index.write(lambda txn: self._mark(txn, newest.name))
            else:
                # A damaged newest checkpoint: the one before it (gc keeps two) still has
                # the facts of the log objects gc compacted away since.
                for info in reversed(checkpoints):
                    if info.name in applied:
                        break  # this host has its facts, and those of every older one
                    seg = self._fetch(info.name)
                    if seg is not None and self._apply_checked(seg, info.name):
                        covered = set(seg.covers)
                        count += 1
                        break
        for info in todo:
            if info.name in covered:
                self.index.write(lambda txn, n=info.name: self._mark(txn, n))
                continue
            seg = self._fetch(info.name)
            if seg is not None and self._apply_checked(seg, info.name):
                count += 1
        stamp = repr(listed_at).encode()
        self.index.write(lambda txn: self.index.put(txn, "meta", _LAST_SYNC_KEY, stamp))
        since = newest.mtime if newest is not None else 0.0
        self._uncovered = sum(1 for i in logs if i.mtime > since)
        return count

    def _fetch(self, name: str) -> Segment | None:
        """A log object decoded; None (and a warning, once) if it is damaged."""
        try:
            raw = self.bucket.get(name)
        except ObjectMissing:
            raise _Compacted(name) from None
        try:
            return Segment.decode(raw, self.keys, name, f"{self.bucket.location.url}/{name}")
        except IntegrityError as exc:
            self._warn(name, str(exc))
            return None

    def _apply_checked(self, seg: Segment, name: str) -> bool:
        """Apply a fetched log object; False (and a warning, once) if its facts are malformed.

        Sealing keeps others from writing an encrypted repository's log, but
        anyone who may write to the bucket of a plain one can put a
        well-formed object with nonsense facts there: that must not stop
        every command on every host with a traceback.  The transaction is
        aborted, so nothing of it is applied.
        """
        try:
            self.index.write(lambda txn: self.apply(txn, seg, name))
        except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
            self._warn(
                name,
                f"{self.bucket.location.url}/{name}: malformed facts "
                f"({type(exc).__name__}: {exc})",
            )
            return False
        return True

    def _warn(self, name: str, message: str) -> None:
        if name not in self._warned:
            self._warned.add(name)
            log.error("%s", message)
            print(f"repofs: warning: {message}; skipped (run 'repofs verify')", file=sys.stderr)

    def _mark(self, txn: Any, name: str) -> None:
        self.index.put(txn, "applied", name.encode(), b"")

    def applied_count(self) -> int:
        return self.index.read(lambda txn: txn.stat(self.index.dbs["applied"])["entries"])

    @property
    def uncovered(self) -> int:
        """Log objects newer than the newest checkpoint, at the last sync."""
        return self._uncovered

    # -- applying ----------------------------------------------------------------

    def apply(self, txn: Any, seg: Segment, name: str) -> None:
        """Apply one log object's facts (order inside matters; across objects it does not)."""
        idx = self.index
        for fact in seg.retire:
            self._retire(txn, bytes.fromhex(fact["pack"]), fact.get("keys", ()))
        for fact in seg.condemn:
            self._condemn(txn, bytes.fromhex(fact["pack"]), fact.get("keys", ()))
        for pack_id, size, entries in seg.packs:
            self._introduce(txn, pack_id, size, entries)
        for body in seg.bury:
            self._bury(txn, body)
        for body in seg.protect:
            self._flag(txn, body)
        for doc in seg.rps:
            self._add_rp(txn, doc)
        self._mark(txn, name)
        if seg.kind == "checkpoint":
            for covered in seg.covers:
                self._mark(txn, covered)
        del idx

    def _introduce(self, txn: Any, pack_id: bytes, size: int, entries: list[Entry]) -> None:
        idx = self.index
        if idx.get(txn, "retired", pack_id) is not None:
            return
        doomed = idx.get(txn, "doomed", pack_id)
        if doomed is None:
            idx.put(txn, "packs", pack_id, encode_pack_info(size, len(entries)))
        else:
            _size, count, gen = decode_doomed(doomed)
            idx.put(txn, "doomed", pack_id, encode_doomed(size, max(count, len(entries)), gen))
        for rtype, digest, offset, stored, raw in entries:
            key = object_key(rtype, digest)
            loc = encode_location(pack_id, offset, stored, raw)
            if doomed is not None:
                if idx.get(txn, "objects", key) is None:
                    idx.put(txn, "condemned", key, encode_condemned(loc, 0))
                continue
            have = idx.get(txn, "objects", key)
            if have is None or pack_id < have[:16]:
                idx.put(txn, "objects", key, loc)
                idx.delete(txn, "condemned", key)

    def _condemn(self, txn: Any, pack_id: bytes, keys_hex: Any) -> None:
        idx = self.index
        if idx.get(txn, "retired", pack_id) is not None:
            return
        info = idx.get(txn, "packs", pack_id)
        size, count = decode_pack_info(info) if info is not None else (0, 0)
        if idx.get(txn, "doomed", pack_id) is None:
            idx.put(txn, "doomed", pack_id, encode_doomed(size, count, 0))
        idx.delete(txn, "packs", pack_id)
        for key_hex in keys_hex:
            key = bytes.fromhex(key_hex)
            have = idx.get(txn, "objects", key)
            if have is not None and have[:16] == pack_id:
                idx.delete(txn, "objects", key)
                idx.put(txn, "condemned", key, encode_condemned(have, 0))

    def _retire(self, txn: Any, pack_id: bytes, keys_hex: Any) -> None:
        idx = self.index
        idx.put(txn, "retired", pack_id, b"")
        idx.delete(txn, "packs", pack_id)
        idx.delete(txn, "doomed", pack_id)
        for key_hex in keys_hex:
            key = bytes.fromhex(key_hex)
            have = idx.get(txn, "objects", key)
            if have is not None and have[:16] == pack_id:
                idx.delete(txn, "objects", key)
            gone = idx.get(txn, "condemned", key)
            if gone is not None and gone[:16] == pack_id:
                idx.delete(txn, "condemned", key)

    def _bury(self, txn: Any, body: dict[str, Any]) -> None:
        idx = self.index
        vm, rp_id, nonce = str(body["vm"]), str(body["id"]), bytes.fromhex(body["nonce"])
        key = idx.rp_key(vm, rp_id)
        value = json.dumps({"vm": vm, "id": rp_id, "nonce": nonce.hex()}, sort_keys=True).encode()
        idx.put(txn, "buried", key + nonce, idx.names.seal_value("buried", key + nonce, value))
        doc = idx.get_rp(txn, vm, rp_id)
        if doc is not None and nonce_of(doc) == nonce:
            idx.delete_rp(txn, vm, rp_id, int(doc["seq"]))

    def _flag(self, txn: Any, body: dict[str, Any]) -> None:
        idx = self.index
        flag = parse_protection(json.dumps(body).encode())
        if flag is None:
            return
        key = idx.rp_key(flag.vm, flag.id)
        have = idx.get(txn, "flags", key)
        if have is not None:
            old = parse_protection(idx.names.open_value("flags", key, have))
            if old is not None and old.flag_seq >= flag.flag_seq:
                return
        raw = json.dumps(body, sort_keys=True).encode()
        idx.put(txn, "flags", key, idx.names.seal_value("flags", key, raw))
        doc = idx.get_rp(txn, flag.vm, flag.id)
        if doc is not None and doc.get("protected_seq", 0) < flag.flag_seq:
            doc["protected"], doc["protected_seq"] = flag.protected, flag.flag_seq
            idx.put_rp_doc(txn, key, doc)

    def _add_rp(self, txn: Any, doc: dict[str, Any]) -> None:
        idx = self.index
        _check_rp_doc(doc, self.shape)
        vm, rp_id = str(doc["vm"]), str(doc["id"])
        key = idx.rp_key(vm, rp_id)
        nonce = nonce_of(doc)
        if idx.get(txn, "buried", key + nonce) is not None:
            return
        have = idx.get_rp(txn, vm, rp_id)
        if have is not None:
            if nonce_of(have) != nonce:
                log.warning("two commits of %s/%s; keeping the first applied", vm, rp_id)
            return
        doc = dict(doc)
        flag_raw = idx.get(txn, "flags", key)
        if flag_raw is not None:
            flag = parse_protection(idx.names.open_value("flags", key, flag_raw))
            if flag is not None and flag.flag_seq > doc.get("protected_seq", 0):
                doc["protected"], doc["protected_seq"] = flag.protected, flag.flag_seq
        vm_seq = idx.vm_seq(txn, vm)
        if vm_seq is None:
            vm_seq = self._free_seq(txn, vm_seq_of(idx, vm), seq_target_vm(vm))
            idx.set_vm_seq(txn, vm, vm_seq)
        seq = self._free_seq(txn, rp_seq_of(idx, vm, rp_id), seq_target_rp(vm, rp_id))
        doc["seq"], doc["vm_seq"] = seq, vm_seq
        idx.put_rp(txn, vm, rp_id, seq, doc)

    def _free_seq(self, txn: Any, seq: int, target: bytes) -> int:
        """``seq``, or the next number not naming something else (a hash collision: rare)."""
        want = decode_seq_target(target)
        while True:
            have = self.index.lookup_seq(txn, seq)
            if have is None or have == want:
                return seq
            seq = seq + 1 if seq + 1 < _SEQ_SPACE + 2 else 2

    # -- checkpoints -------------------------------------------------------------

    def write_checkpoint(self) -> str:
        """Every fact this cache holds, as one object; returns its name."""
        seg = self.index.read(self._checkpoint_of)
        name = f"{CHECKPOINT_PREFIX}{time.time_ns():016x}-{os.urandom(8).hex()}"
        self.bucket.put(name, seg.encode(self.keys, name))
        self.index.write(lambda txn: self._mark(txn, name))
        self._uncovered = 0
        return name

    def _checkpoint_of(self, txn: Any) -> Segment:
        idx = self.index
        by_pack: dict[bytes, list[Entry]] = {}
        for db, decode in (("objects", decode_location), ("condemned", _condemned_loc)):
            for key, value in idx.items(txn, db):
                loc = decode(value)
                by_pack.setdefault(loc.pack_id, []).append(
                    (
                        RecordType(key_type(key)),
                        key_digest(key),
                        loc.offset,
                        loc.stored_len,
                        loc.raw_len,
                    )
                )
        sizes: dict[bytes, int] = {}
        for pack_id, value in idx.items(txn, "packs"):
            sizes[pack_id] = decode_pack_info(value)[0]
        condemn = []
        for pack_id, value in idx.items(txn, "doomed"):
            sizes[pack_id] = decode_doomed(value)[0]
            condemn.append({"pack": pack_id.hex(), "keys": []})
        seg = Segment("checkpoint", condemn=condemn)
        for pack_id in sorted(set(by_pack) | set(sizes)):
            seg.packs.append((pack_id, sizes.get(pack_id, 0), by_pack.get(pack_id, [])))
        seg.retire = [{"pack": p.hex(), "keys": []} for p, _ in idx.items(txn, "retired")]
        seg.rps = [doc for _key, doc in idx.rp_items(txn)]
        for key, value in idx.items(txn, "buried"):
            seg.bury.append(json.loads(idx.names.open_value("buried", key, value)))
        for key, value in idx.items(txn, "flags"):
            seg.protect.append(json.loads(idx.names.open_value("flags", key, value)))
        seg.covers = sorted(
            k.decode() for k, _ in idx.items(txn, "applied") if k.startswith(LOG_PREFIX.encode())
        )
        return seg

    def maybe_checkpoint(self) -> str | None:
        """Write a checkpoint if many log objects lie past the newest; never fails the caller."""
        if self._uncovered < CHECKPOINT_EVERY:
            return None
        with contextlib.suppress(RepofsError):
            return self.write_checkpoint()
        return None

    def checkpoints(self) -> list[ObjectInfo]:
        return sorted(self.bucket.list(CHECKPOINT_PREFIX), key=lambda i: i.name)

    def read_segment(self, name: str) -> Segment:
        """A log object or checkpoint, decoded (errors raise)."""
        raw = self.bucket.get(name)
        return Segment.decode(raw, self.keys, name, f"{self.bucket.location.url}/{name}")

    def logs(self) -> Iterator[ObjectInfo]:
        return self.bucket.list(LOG_PREFIX)


def _check_rp_doc(doc: Any, shape: tuple[int, int] | None) -> None:
    """A ValueError unless ``doc`` reads as a restore point (every command lists it).

    ``shape`` (chunk size, page references) also checks its maps' arithmetic,
    as rebuild-index does for a record.
    """
    if not isinstance(doc, dict) or not isinstance(doc.get("vm"), str):
        raise ValueError("a restore point that is not a document with a VM name")
    rp_id = doc.get("id")
    if not isinstance(rp_id, str) or rp_id_for(rp_id_seconds(rp_id)) != rp_id:
        raise ValueError(f"restore point id {rp_id!r}")
    try:
        validate_vm_name(doc["vm"])
    except RepofsError as exc:
        raise ValueError(str(exc)) from None
    rp = RestorePoint.from_doc({**doc, "seq": 0, "vm_seq": 0})  # TypeError if fields are missing
    number = (int, float)
    fields = [
        isinstance(rp.created, number) and not isinstance(rp.created, bool),
        isinstance(rp.chunk_size, int),
        rp.parent is None or isinstance(rp.parent, str),
        isinstance(rp.consistency, str),
        rp.note is None or isinstance(rp.note, str),
        all(
            isinstance(d.name, str)
            and isinstance(d.allocated_bytes, int)
            and isinstance(d.source_format, str)
            and isinstance(d.source_chain, list)
            for d in rp.disks
        ),
        all(
            isinstance(c.name, str) and isinstance(c.digest, str) and isinstance(c.size, int)
            for c in rp.configs
        ),
    ]
    if not all(fields):
        raise ValueError(f"restore point {rp.vm}/{rp.id}: a field has the wrong type")
    if shape is not None:
        problem = rp.inconsistency(*shape)
        if problem is not None:
            raise ValueError(f"restore point {rp.vm}/{rp.id}: {problem}")


class _Compacted(Exception):
    """A listed log object is gone: gc compacted it into a checkpoint meanwhile."""


def _condemned_loc(value: bytes) -> Any:
    return decode_condemned(value)[0]
