"""Self-describing records, the unit of every pack file.

A pack is a 32-byte header followed by records.  Each record carries its
type, codec, lengths and the BLAKE3 digest of its raw content, plus a CRC of
the header itself, so that ``rebuild-index`` can walk a pack, trust the
lengths it reads, and resynchronise on the record magic past a damaged area.
The layout is documented field by field in ``docs/format.md``.
"""

from __future__ import annotations

import enum
import struct
import threading
import zlib
from typing import NamedTuple

import blake3
import zstandard

from repofs.errors import IntegrityError
from repofs.store.crypto import PLAIN, Keys

PACK_MAGIC = b"REPOFSPK"
PACK_VERSION = 1
PACK_HEADER = struct.Struct("<8sI4x16s")  # magic, version, repository id
RECORD_MAGIC = b"RFRC"
RECORD_HEADER = struct.Struct("<4sBBHII32sI")  # magic type codec flags stored raw digest crc
RECORD_HEADER_SIZE = RECORD_HEADER.size  # 52
MAX_RECORD = 64 * 1024 * 1024
ZERO_DIGEST = bytes(32)

assert PACK_HEADER.size == 32


class RecordType(enum.IntEnum):
    """What a record holds.  The numbers are part of the on-disk format."""

    CHUNK = 1  #: a piece of a virtual disk
    PAGE = 2  #: a map page: up to page_refs 32-byte digests
    BLOB = 3  #: a VM configuration file attached to a restore point
    RESTORE_POINT = 4  #: a restore point's JSON description
    TOMBSTONE = 5  #: JSON naming a restore point removed by prune or delete
    PROTECTION = 6  #: JSON setting or clearing a restore point's protected flag (format 2)


class Codec(enum.IntEnum):
    NONE = 0
    ZSTD = 1


class RecordHeader(NamedTuple):
    """A parsed record header; a tuple because every chunk read builds one."""

    type: RecordType
    codec: Codec
    stored_len: int
    raw_len: int
    digest: bytes


def digest_of(data: bytes | memoryview) -> bytes:
    return blake3.blake3(data).digest()


def pack_header(repository_id: str) -> bytes:
    return PACK_HEADER.pack(PACK_MAGIC, PACK_VERSION, bytes.fromhex(repository_id))


def check_pack_header(data: bytes, repository_id: str, name: str) -> None:
    if len(data) < PACK_HEADER.size:
        raise IntegrityError(f"pack {name}: shorter than its {PACK_HEADER.size}-byte header")
    magic, version, repo = PACK_HEADER.unpack_from(data)
    if magic != PACK_MAGIC:
        raise IntegrityError(f"pack {name}: bad magic {magic!r}")
    if version != PACK_VERSION:
        raise IntegrityError(f"pack {name}: version {version} is not {PACK_VERSION}")
    if repo.hex() != repository_id:
        raise IntegrityError(f"pack {name}: belongs to repository {repo.hex()}, not this one")


def encode_header(
    rtype: RecordType, codec: Codec, stored_len: int, raw_len: int, digest: bytes
) -> bytes:
    body = RECORD_HEADER.pack(RECORD_MAGIC, rtype, codec, 0, stored_len, raw_len, digest, 0)
    crc = zlib.crc32(body[:-4])
    return body[:-4] + struct.pack("<I", crc)


_RECORD_TYPES = {int(t): t for t in RecordType}
_CODECS = {int(c): c for c in Codec}


def decode_header(data: bytes | memoryview, where: str) -> RecordHeader:
    """Parse and check a record header; raise :class:`IntegrityError` naming ``where``."""
    if len(data) < RECORD_HEADER_SIZE:
        raise IntegrityError(f"{where}: truncated record header")
    magic, rtype, codec, _flags, stored, raw, digest, crc = RECORD_HEADER.unpack_from(data)
    if magic != RECORD_MAGIC:
        raise IntegrityError(f"{where}: bad record magic")
    if zlib.crc32(data[: RECORD_HEADER_SIZE - 4]) != crc:
        raise IntegrityError(f"{where}: record header checksum mismatch")
    rt, cd = _RECORD_TYPES.get(rtype), _CODECS.get(codec)  # not Enum(): slow per chunk
    if rt is None or cd is None:
        raise IntegrityError(f"{where}: unknown record type {rtype} or codec {codec}")
    if stored > MAX_RECORD or raw > MAX_RECORD:
        raise IntegrityError(f"{where}: record length {max(stored, raw)} is absurd")
    return RecordHeader(rt, cd, stored, raw, digest)


class Compressor:
    """Per-thread zstd state: zstandard contexts must not be shared across threads."""

    def __init__(self, codec: str, level: int) -> None:
        self._zstd = zstandard.ZstdCompressor(level=level) if codec == "zstd" else None

    def compress(self, raw: bytes) -> tuple[Codec, bytes]:
        """Compress ``raw``, or keep it as it is when compression would not shrink it."""
        if self._zstd is not None:
            packed = self._zstd.compress(raw)
            if len(packed) < len(raw):
                return Codec.ZSTD, packed
        return Codec.NONE, raw


_LOCAL = threading.local()


def thread_decompressor() -> zstandard.ZstdDecompressor:
    """This thread's zstd decompression context.

    Creating one costs more than decompressing a 64 KiB chunk (measured in
    docs/performance.md), and a context must not be shared across threads.
    """
    dctx = getattr(_LOCAL, "dctx", None)
    if dctx is None:
        dctx = _LOCAL.dctx = zstandard.ZstdDecompressor()
    return dctx


def decode_payload(
    hdr: RecordHeader, payload: bytes | memoryview, where: str, keys: Keys = PLAIN
) -> bytes:
    """Open (if sealed), decompress a record's payload and check it against its digest.

    This check on every read is what lets the mount promise the ingested byte
    or an I/O error, never a wrong byte.  In an encrypted repository the
    AEAD tag proves the payload is the one sealed under this type and name,
    and the keyed digest of the plaintext must still be the name.
    """
    if len(payload) != hdr.stored_len:
        raise IntegrityError(
            f"{where}: payload truncated ({len(payload)} of {hdr.stored_len} bytes)"
        )
    if keys.encrypted:
        payload = keys.open(hdr.type, hdr.digest, payload, where)
    if hdr.codec == Codec.ZSTD:
        try:
            raw = thread_decompressor().decompress(payload, max_output_size=hdr.raw_len)
        except zstandard.ZstdError as exc:
            raise IntegrityError(f"{where}: cannot decompress: {exc}") from None
    else:
        raw = payload if type(payload) is bytes else bytes(payload)
    if len(raw) != hdr.raw_len:
        raise IntegrityError(f"{where}: decompressed to {len(raw)} bytes, expected {hdr.raw_len}")
    if keys.name(raw) != hdr.digest:
        raise IntegrityError(f"{where}: content does not match its digest")
    return raw
