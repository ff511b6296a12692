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
import struct
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
    decode_doomed,
    decode_pack_info,
    decode_seq_target,
    encode_condemned,
    encode_doomed,
    encode_pack_info,
    key_type,
    object_key,
    seq_target_rp,
    seq_target_vm,
)
from repofs.store.segment import ENTRY, Entry, Segment

LOG_PREFIX = "log/"
CHECKPOINT_PREFIX = "checkpoints/"
CHECKPOINT_GROWTH = 8  #: log bytes past the newest checkpoint, times this, must reach its size
FETCH_THREADS = 16  #: log objects fetched at once by a sync
CHECKPOINT_EVERY = 64  #: log objects past the newest checkpoint before a commit writes one
_SEQ_SPACE = (1 << 47) - 2
_LAST_SYNC_KEY = b"s3lastsync"
_LOC_TAIL = struct.Struct(">QII")  #: a ``locs`` value: offset, stored length, raw length
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
        self._uncovered_bytes = 0
        self._checkpoint_bytes = 0
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
        wanted = [i.name for i in todo if i.name not in covered]
        fetched = self._fetch_all(wanted)
        stamp = repr(listed_at).encode()

        def txn_fn(txn: Any) -> None:
            for info in todo:
                if info.name in covered:
                    self._mark(txn, info.name)
            applied_now = 0
            for name, seg in zip(wanted, fetched, strict=True):
                if seg is not None and self._apply_nested(txn, seg, name):
                    applied_now += 1
            self.index.put(txn, "meta", _LAST_SYNC_KEY, stamp)
            return applied_now

        count += self.index.write(txn_fn)  # one transaction: one fsync, however many objects
        since = newest.mtime if newest is not None else 0.0
        past = [i for i in logs if i.mtime > since]
        self._uncovered = len(past)
        self._uncovered_bytes = sum(i.size for i in past)
        self._checkpoint_bytes = newest.size if newest is not None else 0
        return count

    def _fetch_all(self, names: list[str]) -> list[Segment | None]:
        """:meth:`_fetch` of many, in parallel (a fresh host's first sync, a WAN's latency)."""
        if len(names) <= 1:
            return [self._fetch(n) for n in names]
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(min(FETCH_THREADS, len(names))) as pool:
            return list(pool.map(self._fetch, names))

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

    def _apply_nested(self, txn: Any, seg: Segment, name: str) -> bool:
        """:meth:`_apply_checked` inside a batch: a nested transaction undoes a malformed one."""
        child = self.index.env.begin(write=True, parent=txn)
        try:
            self.apply(child, seg, name)
        except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
            child.abort()
            self._warn(
                name,
                f"{self.bucket.location.url}/{name}: malformed facts "
                f"({type(exc).__name__}: {exc})",
            )
            return False
        except BaseException:
            child.abort()
            raise
        child.commit()
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
            at = int(fact.get("at", 0))
            self._condemn(txn, bytes.fromhex(fact["pack"]), fact.get("keys", ()), at)
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
            # A checkpoint names condemned and retired packs without their keys (it
            # keeps no locations in retired packs), but this cache may hold locations
            # in them from commits it applied before: settle every such object.
            touched = {bytes.fromhex(f["pack"]) for f in (*seg.retire, *seg.condemn)}
            if touched:
                self._resettle(txn, touched)
        del idx

    def _resettle(self, txn: Any, packs: set[bytes]) -> None:
        """Drop locations in retired packs among ``packs`` and settle every object in them."""
        idx = self.index
        keys: list[bytes] = []
        for k, _tail in idx.items(txn, "locs"):
            if k[-16:] in packs:
                keys.append(k)
        for k in keys:
            if idx.get(txn, "retired", k[-16:]) is not None:
                idx.delete(txn, "locs", k)
        for key in dict.fromkeys(k[:-16] for k in keys):
            self._settle(txn, key)

    # Every location of every object is kept in ``locs`` (object key + pack id -> offset,
    # stored and raw length); ``objects`` and ``condemned`` are derived from it by
    # :meth:`_settle`, a pure function of the facts applied.  Keeping only one location
    # per object made hosts that applied the same facts in another order disagree on
    # where an object lies, and a later retire could then strand one of them on a
    # deleted pack while the object still existed in another.

    def _introduce(self, txn: Any, pack_id: bytes, size: int, entries: Any) -> None:
        idx = self.index
        if idx.get(txn, "retired", pack_id) is not None:
            return
        doomed = idx.get(txn, "doomed", pack_id)
        count = len(entries) if not isinstance(entries, bytes) else len(entries) // ENTRY.size
        if doomed is None:
            idx.put(txn, "packs", pack_id, encode_pack_info(size, count))
        else:
            _size, have, at = decode_doomed(doomed)
            idx.put(txn, "doomed", pack_id, encode_doomed(size, max(have, count), at))
        for rtype, digest, offset, stored, raw in entries:
            key = object_key(rtype, digest)
            tail = _LOC_TAIL.pack(offset, stored, raw)
            idx.put(txn, "locs", key + pack_id, tail)
            # What _settle would find, in O(1): the derived tables already hold the
            # minimum of every other location, so only the new one can change them.
            loc = pack_id + tail
            live = idx.get(txn, "objects", key)
            if doomed is None:
                if live is None or loc < live:
                    idx.put(txn, "objects", key, loc)
                    idx.delete(txn, "condemned", key)
            elif live is None:
                gone = idx.get(txn, "condemned", key)
                if gone is None or loc < gone[: len(loc)]:
                    idx.put(txn, "condemned", key, encode_condemned(loc, 0))

    def _condemn(self, txn: Any, pack_id: bytes, keys_hex: Any, at: int) -> None:
        idx = self.index
        if idx.get(txn, "retired", pack_id) is not None:
            return
        have = idx.get(txn, "doomed", pack_id)
        if have is None or decode_doomed(have)[2] > at:
            info = idx.get(txn, "packs", pack_id)
            size, count = decode_pack_info(info) if info is not None else (0, 0)
            if have is not None:
                size, count, _ = decode_doomed(have)
            idx.put(txn, "doomed", pack_id, encode_doomed(size, count, at))  # the earliest
        idx.delete(txn, "packs", pack_id)
        for key_hex in keys_hex:
            self._settle(txn, bytes.fromhex(key_hex))

    def _retire(self, txn: Any, pack_id: bytes, keys_hex: Any) -> None:
        idx = self.index
        idx.put(txn, "retired", pack_id, b"")
        idx.delete(txn, "packs", pack_id)
        idx.delete(txn, "doomed", pack_id)
        for key_hex in keys_hex:
            key = bytes.fromhex(key_hex)
            idx.delete(txn, "locs", key + pack_id)
            self._settle(txn, key)

    def _settle(self, txn: Any, key: bytes) -> None:
        """Set ``objects``/``condemned`` of ``key`` from its locations: the smallest live pack id,
        else the smallest condemned one; retired ones are never used."""
        idx = self.index
        live = doomed = None
        for k, tail in idx.items(txn, "locs", key):
            pack_id = k[len(key) :]
            if len(pack_id) != 16:
                continue
            if idx.get(txn, "retired", pack_id) is not None:
                continue
            loc = pack_id + tail
            if idx.get(txn, "doomed", pack_id) is None:
                live = loc if live is None else min(live, loc)
            else:
                doomed = loc if doomed is None else min(doomed, loc)
        if live is not None:
            idx.put(txn, "objects", key, live)
            idx.delete(txn, "condemned", key)
        else:
            idx.delete(txn, "objects", key)
            if doomed is not None:
                idx.put(txn, "condemned", key, encode_condemned(doomed, 0))
            else:
                idx.delete(txn, "condemned", key)

    def keys_in_packs(self, txn: Any, packs: set[bytes]) -> dict[bytes, list[bytes]]:
        """Every object key with a location in one of ``packs`` (gc's condemn and retire lists)."""
        out: dict[bytes, list[bytes]] = {p: [] for p in packs}
        for k, _tail in self.index.items(txn, "locs"):
            pack_id = k[-16:]
            if pack_id in out:
                out[pack_id].append(k[:-16])
        return out

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
        """Every fact this cache holds, as one object; returns its name.

        It syncs first: a checkpoint written from a cache synced long ago
        (after a long ingest) would be the newest yet lack facts whose log
        objects gc removes as covered by an older checkpoint.
        """
        self.sync()
        seg = self.index.read(self._checkpoint_of)
        name = f"{CHECKPOINT_PREFIX}{time.time_ns():016x}-{os.urandom(8).hex()}"
        self.bucket.put(name, seg.encode(self.keys, name))
        self.index.write(lambda txn: self._mark(txn, name))
        self._uncovered = 0
        return name

    def _checkpoint_of(self, txn: Any) -> Segment:
        idx = self.index
        by_pack: dict[bytes, list[Entry]] = {}
        for k, tail in idx.items(txn, "locs"):
            offset, stored, raw = _LOC_TAIL.unpack(tail)
            by_pack.setdefault(k[-16:], []).append(
                (RecordType(key_type(k)), k[1:-16], offset, stored, raw)
            )
        sizes: dict[bytes, int] = {}
        for pack_id, value in idx.items(txn, "packs"):
            sizes[pack_id] = decode_pack_info(value)[0]
        condemn = []
        for pack_id, value in idx.items(txn, "doomed"):
            size, _count, at = decode_doomed(value)
            sizes[pack_id] = size
            condemn.append({"pack": pack_id.hex(), "keys": [], "at": at})
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
        # Both: enough objects that a fresh host would wait for them, and enough bytes
        # that the new checkpoint is not mostly a copy of the last (a checkpoint of a
        # large repository is large; writing one every 64 commits would cost more than
        # the commits).  So checkpoints cost at most CHECKPOINT_GROWTH times the log.
        if self._uncovered < CHECKPOINT_EVERY:
            return None
        if self._uncovered_bytes * CHECKPOINT_GROWTH < self._checkpoint_bytes:
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
