"""The container of every small object the bucket's log holds: commits, facts, checkpoints.

Layout (``docs/format.md``, "Bucket objects")::

    magic "RPFSLOG1" (8) | sealed( zstd( header length (u32) | header JSON | entries ) )

``entries`` are the object entries of the packs the header lists, in its
order, each ``type (1) | digest (32) | offset (u64) | stored (u32) | raw (u32)``
(49 bytes, big-endian), so a commit of a terabyte of new chunks stays a
compact binary table rather than JSON.  Sealing binds the object's bucket
name into the associated data (an object moved to another name does not
open); an unencrypted repository keeps a BLAKE3 checksum of the
compressed body instead, so damage is still told from content.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import blake3
import zstandard

from repofs.errors import IntegrityError
from repofs.store.crypto import Keys
from repofs.store.records import RecordType

MAGIC = b"RPFSLOG1"
VERSION = 1
#: The AEAD's record type byte for log objects (no pack record uses it).
LOG_RTYPE = 0x4C
ENTRY = struct.Struct(">B32sQII")
_LEN = struct.Struct(">I")
MAX_HEADER = 1 << 30

Entry = tuple[RecordType, bytes, int, int, int]  # type, digest, offset, stored, raw length


@dataclass
class Segment:
    """What one log object (or checkpoint) says; every list may be empty."""

    kind: str  #: "commit", "facts" or "checkpoint"
    #: packs introduced: (pack id, size, entries)
    packs: list[tuple[bytes, int, list[Entry]]] = field(default_factory=list)
    #: restore points: their index documents (with "record", the commit's nonce)
    rps: list[dict[str, Any]] = field(default_factory=list)
    bury: list[dict[str, Any]] = field(default_factory=list)  #: {"vm", "id", "nonce"}
    protect: list[dict[str, Any]] = field(default_factory=list)  #: Protection bodies
    condemn: list[dict[str, Any]] = field(default_factory=list)  #: {"pack", "keys": [hex]}
    retire: list[dict[str, Any]] = field(default_factory=list)  #: {"pack", "keys": [hex]}
    covers: list[str] = field(default_factory=list)  #: checkpoints: log names included
    extra: dict[str, Any] = field(default_factory=dict)

    def encode(self, keys: Keys, name: str) -> bytes:
        header = {
            "v": VERSION,
            "kind": self.kind,
            "packs": [[p.hex(), size, len(entries)] for p, size, entries in self.packs],
            "rps": self.rps,
            "bury": self.bury,
            "protect": self.protect,
            "condemn": self.condemn,
            "retire": self.retire,
            "covers": self.covers,
            **({"extra": self.extra} if self.extra else {}),
        }
        head = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
        parts = [_LEN.pack(len(head)), head]
        for _pack, _size, entries in self.packs:
            parts.append(b"".join(ENTRY.pack(int(t), d, o, s, r) for t, d, o, s, r in entries))
        body = zstandard.ZstdCompressor(level=3).compress(b"".join(parts))
        if keys.encrypted:
            return MAGIC + keys.seal(LOG_RTYPE, _bound(name), body)
        return MAGIC + blake3.blake3(body).digest() + body

    @classmethod
    def decode(cls, data: bytes, keys: Keys, name: str, where: str) -> Segment:
        if not data.startswith(MAGIC):
            raise IntegrityError(f"{where}: not a repofs log object (bad magic)")
        rest = memoryview(data)[len(MAGIC) :]
        if keys.encrypted:
            body = keys.open(LOG_RTYPE, _bound(name), rest, where)
        else:
            if len(rest) < 32 or blake3.blake3(rest[32:]).digest() != bytes(rest[:32]):
                raise IntegrityError(f"{where}: damaged (checksum mismatch)")
            body = bytes(rest[32:])
        try:
            raw = zstandard.ZstdDecompressor().decompress(body, max_output_size=1 << 34)
        except zstandard.ZstdError as exc:
            raise IntegrityError(f"{where}: cannot decompress: {exc}") from None
        try:
            (hlen,) = _LEN.unpack_from(raw, 0)
            if hlen > MAX_HEADER or 4 + hlen > len(raw):
                raise ValueError("header length")
            header = json.loads(raw[4 : 4 + hlen])
            if header.get("v") != VERSION:
                raise IntegrityError(
                    f"{where}: log object version {header.get('v')!r} is not supported "
                    "(written by a newer repofs?)"
                )
            seg = cls(
                kind=str(header["kind"]),
                rps=list(header.get("rps", [])),
                bury=list(header.get("bury", [])),
                protect=list(header.get("protect", [])),
                condemn=list(header.get("condemn", [])),
                retire=list(header.get("retire", [])),
                covers=[str(n) for n in header.get("covers", [])],
                extra=dict(header.get("extra", {})),
            )
            pos = 4 + hlen
            for pack_hex, size, count in header.get("packs", []):
                end = pos + count * ENTRY.size
                if end > len(raw):
                    raise ValueError("entries run past the end")
                entries = [(RecordType(t), d, o, s, r) for t, d, o, s, r in _iter(raw, pos, count)]
                seg.packs.append((bytes.fromhex(pack_hex), int(size), entries))
                pos = end
        except IntegrityError:
            raise
        except (ValueError, KeyError, TypeError, struct.error) as exc:
            raise IntegrityError(f"{where}: malformed log object ({exc})") from None
        return seg


def _iter(raw: bytes, pos: int, count: int) -> Iterator[tuple[int, bytes, int, int, int]]:
    return ENTRY.iter_unpack(memoryview(raw)[pos : pos + count * ENTRY.size])  # type: ignore[return-value]


def _bound(name: str) -> bytes:
    """What the seal binds: the object's name in the repository (32 bytes)."""
    return blake3.blake3(name.encode()).digest()
