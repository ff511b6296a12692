"""verify's hot loop: every record of one window checked against the index, then re-hashed.

Apart from the verifier because it runs on every core, on buffers the
reader lent, and must touch nothing shared: it gets a window and its bytes
and gives back only the failures.
"""

from __future__ import annotations

import zlib

import blake3
import zstandard

from repofs.errors import IntegrityError
from repofs.maintenance.verify.windows import _Entry, _Failures, _Window
from repofs.store.crypto import PLAIN, Keys
from repofs.store.records import (
    RECORD_HEADER,
    RECORD_HEADER_SIZE,
    RECORD_MAGIC,
    Codec,
    decode_header,
    thread_decompressor,
)


def _check_window(data: memoryview, window: _Window, keys: Keys = PLAIN) -> _Failures:
    """Check every record of one window: header, that it is the object indexed, its content.

    verify's hot loop, run on every core: zstd and BLAKE3 release the GIL,
    so what runs under it (header fields, compares) is kept to a few plain
    operations per record.  Payloads are sliced out of ``data`` without
    copies, and the exact message of a bad header is only worked out when
    one fails.
    """
    unpack = RECORD_HEADER.unpack_from
    crc32 = zlib.crc32
    hasher = keys.name if keys.encrypted else lambda raw: blake3.blake3(raw).digest()
    size = len(data)
    base = window.start
    dctx = thread_decompressor()
    zstd, raw_codec = int(Codec.ZSTD), int(Codec.NONE)
    failures: _Failures = []
    for e in window.entries:
        start = e.offset - base
        body = start + RECORD_HEADER_SIZE
        end = body + e.stored_len
        if end > size:
            failures.append(
                (
                    e,
                    f"{_where(e)}: truncated: the record needs {end - start} bytes, "
                    f"the pack ends at {base + size}",
                )
            )
            continue
        magic, rtype, codec, _flags, stored, raw_len, digest, crc = unpack(data, start)
        if (
            magic != RECORD_MAGIC
            or crc32(data[start : body - 4]) != crc
            or rtype != e.rtype
            or digest != e.digest
            or stored != e.stored_len
            or raw_len != e.raw_len
            or codec not in (zstd, raw_codec)
        ):
            failures.append((e, _header_problem(data[start:body], e)))
            continue
        payload: bytes | memoryview = data[body:end]
        if keys.encrypted:
            try:
                payload = keys.open(rtype, digest, payload, _where(e))
            except IntegrityError as exc:
                failures.append((e, str(exc)))
                continue
        if codec == zstd:
            try:
                raw: bytes | memoryview = dctx.decompress(payload, max_output_size=raw_len)
            except zstandard.ZstdError as exc:
                failures.append((e, f"{_where(e)}: cannot decompress: {exc}"))
                continue
            if len(raw) != raw_len:
                failures.append(
                    (e, f"{_where(e)}: decompressed to {len(raw)} bytes, expected {raw_len}")
                )
                continue
        else:
            raw = payload
        if hasher(raw) != digest:
            failures.append((e, f"{_where(e)}: content does not match its digest"))
    return failures


def _where(e: _Entry) -> str:
    return f"pack {e.pack_id.hex()} offset {e.offset}"


def _header_problem(header: memoryview, e: _Entry) -> str:
    """What is wrong with a record header that failed the quick checks, in decode_header's words."""
    where = _where(e)
    try:
        hdr = decode_header(header, where)
    except IntegrityError as exc:
        return str(exc)
    if hdr.type != e.rtype or hdr.digest != e.digest:
        return f"{where}: holds another object than the index says"
    return f"{where}: lengths differ from the index"
