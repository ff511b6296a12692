"""store/schema: the bytes of the index's keys and values, pinned to docs/format.md."""

from __future__ import annotations

from repofs.store.records import RecordType
from repofs.store.schema import (
    Location,
    SeqTarget,
    condemned_generation,
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
    raw_len_suffix,
    rp_key,
    seq_key,
    seq_target_rp,
    seq_target_vm,
    split_rp_key,
    whole_key,
)

PACK = bytes(range(16))
DIGEST = bytes(range(32, 64))


class TestKeys:
    def test_object_key_is_type_then_digest(self) -> None:
        """An objects key is the record type byte, then the 32-byte digest."""
        key = object_key(RecordType.PAGE, DIGEST)
        assert key == bytes((RecordType.PAGE,)) + DIGEST
        assert (key_type(key), key_digest(key)) == (RecordType.PAGE, DIGEST)

    def test_rp_key_round_trips(self) -> None:
        """An rps key is VM, NUL, id; it splits back into both."""
        assert rp_key("vm-1", "2026-01-02T03:04:05Z") == b"vm-1\0002026-01-02T03:04:05Z"
        assert split_rp_key(rp_key("vm-1", "x")) == ("vm-1", "x")

    def test_meta_and_seq_keys_are_big_endian(self) -> None:
        """Sequence numbers in keys are big-endian u64, so LMDB sorts them numerically."""
        assert seq_key(258) == b"\0" * 6 + b"\x01\x02"
        assert whole_key(1) == b"whole\0" + b"\0" * 7 + b"\x01"


class TestValues:
    def test_location_layout(self) -> None:
        """pack id (16), offset u64, stored u32, raw u32: 32 bytes, big-endian."""
        raw = encode_location(PACK, 5, 6, 7)
        fields = (5).to_bytes(8, "big") + (6).to_bytes(4, "big") + (7).to_bytes(4, "big")
        assert raw == PACK + fields
        assert decode_location(raw) == Location(PACK, 5, 6, 7)
        assert raw.endswith(raw_len_suffix(7))

    def test_pack_info_and_doomed(self) -> None:
        """packs: size u64 + count u32; doomed adds the gc generation as u64."""
        assert decode_pack_info(encode_pack_info(1 << 40, 3)) == (1 << 40, 3)
        doomed = encode_doomed(1 << 40, 3, 9)
        assert doomed == encode_pack_info(1 << 40, 3) + (9).to_bytes(8, "big")
        assert decode_doomed(doomed) == (1 << 40, 3, 9)

    def test_condemned_is_location_then_generation(self) -> None:
        """A condemned value is the objects value it replaced, then the gc generation."""
        raw = encode_condemned(encode_location(PACK, 5, 6, 7), 11)
        assert decode_condemned(raw) == (Location(PACK, 5, 6, 7), 11)
        assert condemned_generation(raw) == 11

    def test_seq_targets(self) -> None:
        """seqs values name a VM (b"V" + name) or a restore point (b"R" + rps key)."""
        assert seq_target_vm("vm") == b"Vvm"
        assert decode_seq_target(seq_target_vm("vm")) == SeqTarget("vm", None)
        assert seq_target_rp("vm", "id") == b"R" + rp_key("vm", "id")
        assert decode_seq_target(seq_target_rp("vm", "id")) == SeqTarget("vm", "id")
