"""Applying the bucket's log: idempotent and independent of order, so hosts converge.

These run on real LMDB caches without a bucket: applying needs only the index.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

import pytest

from repofs.store.bucketlog import BucketLog, hashed_seq
from repofs.store.crypto import PLAIN, SealedKeys
from repofs.store.index import Index
from repofs.store.records import RecordType
from repofs.store.schema import object_key
from repofs.store.segment import Segment


def _digest(i: int) -> bytes:
    return i.to_bytes(4, "big") * 8


def _pack(i: int) -> bytes:
    return bytes([i]) * 16


def _keys(numbers: Any) -> list[str]:
    return [object_key(RecordType.CHUNK, _digest(i)).hex() for i in numbers]


def _rp(vm: str, rp_id: str, pack: int, protected_seq: int = 0) -> dict[str, Any]:
    return {
        "vm": vm,
        "id": rp_id,
        "seq": 0,
        "vm_seq": 0,
        "created": 1.0,
        "chunk_size": 65536,
        "disks": [],
        "configs": [],
        "record": [_pack(pack).hex(), 0],
        "protected": False,
        "protected_seq": protected_seq,
    }


def _facts() -> list[Segment]:
    """A small history: two ingests sharing a chunk, a prune, a protect, a gc."""
    return [
        Segment(
            "commit",
            packs=[
                (_pack(1), 1000, [(RecordType.CHUNK, _digest(i), i * 10, 5, 9) for i in range(5)])
            ],
            rps=[_rp("web01", "2026-01-01T000000Z", 1)],
        ),
        Segment(
            "commit",
            packs=[
                (_pack(2), 900, [(RecordType.CHUNK, _digest(i), i * 10, 5, 9) for i in range(3, 8)])
            ],
            rps=[_rp("web01", "2026-01-02T000000Z", 2)],
        ),
        Segment(
            "facts", bury=[{"vm": "web01", "id": "2026-01-01T000000Z", "nonce": _pack(1).hex()}]
        ),
        Segment(
            "facts",
            protect=[
                {
                    "vm": "web01",
                    "id": "2026-01-02T000000Z",
                    "seq": 0,
                    "flag_seq": 5,
                    "protected": True,
                }
            ],
        ),
        Segment(
            "facts",
            protect=[
                {
                    "vm": "web01",
                    "id": "2026-01-02T000000Z",
                    "seq": 0,
                    "flag_seq": 3,
                    "protected": False,
                }
            ],
        ),
        # gc lists every key its cache locates in the pack: 3 and 4 live in both packs,
        # and the smaller id (pack 1) holds them on every host
        Segment("facts", condemn=[{"pack": _pack(1).hex(), "keys": _keys(range(5))}]),
        # phase 2: the live objects only the condemned pack holds (as gc sees it) are
        # copied first, then the pack is retired
        Segment(
            "facts",
            packs=[(_pack(3), 50, [(RecordType.CHUNK, _digest(i), i * 10, 5, 9) for i in (3, 4)])],
        ),
        Segment("facts", retire=[{"pack": _pack(1).hex(), "keys": _keys(range(5))}]),
    ]


def _state(index: Index) -> dict[str, Any]:
    def read(txn: Any) -> dict[str, Any]:
        out = {}
        for db in ("objects", "packs", "condemned", "retired", "vms", "seqs"):
            out[db] = sorted(index.items(txn, db))
        out["rps"] = sorted((k, json.dumps(d, sort_keys=True)) for k, d in index.rp_items(txn))
        return out

    return index.read(read)


def _apply_all(tmp: Path, name: str, order: list[int], keys: Any = PLAIN) -> dict[str, Any]:
    index = Index(str(tmp / name), create=True)
    index.names = keys
    log = BucketLog(None, keys, index)  # type: ignore[arg-type]
    segs = _facts()
    for i in order:
        index.write(lambda txn, i=i: log.apply(txn, segs[i], f"log/x{i}"))
    state = _state(index)
    index.close()
    return state


class TestApply:
    def test_every_order_gives_the_same_cache(self, tmp_path: Path) -> None:
        """Hosts that apply the same log objects in different orders end with identical tables."""
        n = len(_facts())
        want = _apply_all(tmp_path, "ref", list(range(n)))
        rng = random.Random(7)
        for trial in range(12):
            order = list(range(n))
            rng.shuffle(order)
            assert _apply_all(tmp_path, f"t{trial}", order) == want, order

    def test_applying_twice_changes_nothing(self, tmp_path: Path) -> None:
        """A log object applied again (a second process on the host, a checkpoint) is a no-op."""
        n = len(_facts())
        once = _apply_all(tmp_path, "once", list(range(n)))
        twice = _apply_all(tmp_path, "twice", list(range(n)) * 2)
        assert once == twice

    def test_the_history_means_what_it_says(self, tmp_path: Path) -> None:
        """The buried restore point is gone, the newest flag wins, the retired pack is forgotten."""
        state = _apply_all(tmp_path, "s", list(range(len(_facts()))))
        rps = [json.loads(d) for _k, d in state["rps"]]
        assert [d["id"] for d in rps] == ["2026-01-02T000000Z"]
        assert rps[0]["protected"] is True and rps[0]["protected_seq"] == 5
        objects = {k: v for k, v in state["objects"]}
        for i in range(8):
            key = object_key(RecordType.CHUNK, _digest(i))
            # chunks 0-2 lived only in the retired pack; 3-7 live in pack 2 (3 and 4 were in both)
            assert (key in objects) == (i >= 3)
            if i >= 3:
                assert objects[key][:16] == _pack(2)
        assert [k for k, _ in state["retired"]] == [_pack(1)]

    def test_the_smaller_pack_id_wins(self, tmp_path: Path) -> None:
        """A digest in two packs is located in the smaller pack id, whichever came first."""
        state = _apply_all(tmp_path, "w", [1, 0])
        key = object_key(RecordType.CHUNK, _digest(3))
        assert dict(state["objects"])[key][:16] == _pack(1)

    def test_a_condemned_pack_arriving_later_is_not_deduplicated_against(
        self, tmp_path: Path
    ) -> None:
        """Introduced after its condemnation, a pack's objects go to the condemned table."""
        state = _apply_all(tmp_path, "c", [5, 0])  # condemn, then the commit of the pack
        condemned = dict(state["condemned"])
        assert object_key(RecordType.CHUNK, _digest(0)) in condemned
        assert object_key(RecordType.CHUNK, _digest(0)) not in dict(state["objects"])

    def test_a_buried_commit_arriving_later_stays_buried(self, tmp_path: Path) -> None:
        """A prune applied before the commit it removes still removes it."""
        state = _apply_all(tmp_path, "b", [2, 0])
        assert state["rps"] == []

    @pytest.mark.parametrize("encrypted", [False, True])
    def test_inode_numbers_agree_across_hosts(self, tmp_path: Path, encrypted: bool) -> None:
        """Two caches give a restore point and its VM the same sequence numbers (inode numbers)."""
        keys = (
            SealedKeys(os.urandom(32), "aes-256-gcm", os.urandom(16).hex()) if encrypted else PLAIN
        )
        a = _apply_all(tmp_path, "a", [0, 1], keys)
        b = _apply_all(tmp_path, "b", [1, 0], keys)
        # (values are sealed with random nonces in an encrypted cache: compare the numbers)
        assert a["seqs"] and [k for k, _ in a["seqs"]] == [k for k, _ in b["seqs"]]
        assert [v for _, v in a["vms"]] == [v for _, v in b["vms"]]
        seqs = [int.from_bytes(k, "big") for k, _ in a["seqs"]]
        assert all(2 <= s < 1 << 47 for s in seqs)

    def test_a_checkpoint_retires_what_this_cache_learnt_before(self, tmp_path: Path) -> None:
        """A host that applied a commit, then only a checkpoint retiring its pack, forgets it."""
        index = Index(str(tmp_path / "late"), create=True)
        log = BucketLog(None, PLAIN, index)  # type: ignore[arg-type]
        segs = _facts()
        index.write(lambda txn: log.apply(txn, segs[0], "log/c0"))
        # the checkpoint another host wrote after the whole history (gc compacted the log)
        ref = Index(str(tmp_path / "ref"), create=True)
        ref_log = BucketLog(None, PLAIN, ref)  # type: ignore[arg-type]
        for i, seg in enumerate(segs):
            ref.write(lambda txn, seg=seg, i=i: ref_log.apply(txn, seg, f"log/x{i}"))
        checkpoint = ref.read(ref_log._checkpoint_of)
        index.write(lambda txn: log.apply(txn, checkpoint, "checkpoints/1"))
        assert _state(index)["objects"] == _state(ref)["objects"]
        assert _state(index)["condemned"] == _state(ref)["condemned"]
        index.close()
        ref.close()


class TestSegment:
    @pytest.mark.parametrize("encrypted", [False, True])
    def test_round_trip(self, encrypted: bool) -> None:
        """Every field comes back as written."""
        keys = (
            SealedKeys(os.urandom(32), "aes-256-gcm", os.urandom(16).hex()) if encrypted else PLAIN
        )
        seg = _facts()[0]
        back = Segment.decode(seg.encode(keys, "log/c-1"), keys, "log/c-1", "x")
        assert back.packs == seg.packs and back.rps == seg.rps and back.kind == "commit"

    def test_a_sealed_object_does_not_open_under_another_name(self) -> None:
        """Sealing binds the name: a commit copied over another's name is refused."""
        from repofs.errors import IntegrityError

        keys = SealedKeys(os.urandom(32), "aes-256-gcm", os.urandom(16).hex())
        data = _facts()[0].encode(keys, "log/c-1")
        with pytest.raises(IntegrityError):
            Segment.decode(data, keys, "log/c-2", "x")

    def test_a_flipped_byte_is_damage(self) -> None:
        """An unencrypted log object keeps a checksum: one flipped byte is an error, not a fact."""
        from repofs.errors import IntegrityError

        data = bytearray(_facts()[0].encode(PLAIN, "log/c-1"))
        data[-3] ^= 1
        with pytest.raises(IntegrityError):
            Segment.decode(bytes(data), PLAIN, "log/c-1", "x")


def test_hashed_seq_is_stable() -> None:
    """The numbers are a pure function of the names (the same on every host and release)."""
    assert hashed_seq(b"vm", b"web01") == hashed_seq(b"vm", b"web01")
    assert hashed_seq(b"vm", b"web01") != hashed_seq(b"vm", b"web02")
