"""Shared helpers for the qcow2/VHD/VHDX reader tests.

qemu-img is the independent reference: every image a test builds is read
back through our reader and through ``qemu-img convert -O raw`` and the bytes
must match.  Where qemu cannot create an image (VHD and VHDX differencing
disks) the builders below write it from the Microsoft specifications; the
same builders also write the non-differencing variant, which qemu *can* read,
so the builders themselves are checked against qemu before their
differencing output is trusted.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import struct
import subprocess
import tempfile
import tracemalloc
import uuid
from itertools import islice
from pathlib import Path

import pytest

from ingest.formats.detect import open_source
from ingest.formats.source import DiskSource
from ingest.formats.vhdx import (
    BAT_GUID,
    DISK_ID,
    DISK_SIZE,
    FILE_PARAMS,
    LOGICAL_SECTOR,
    METADATA_GUID,
    PARENT_LOCATOR,
    PHYSICAL_SECTOR,
    VHDX_LOCATOR_TYPE,
    crc32c,
)
from repofs.errors import SourceError

KiB, MiB = 1024, 1024 * 1024

requires_qemu = pytest.mark.skipif(
    shutil.which("qemu-img") is None or shutil.which("qemu-io") is None,
    reason="qemu-img/qemu-io (Debian qemu-utils) are the reference and are not installed",
)


def run(*args: str | os.PathLike) -> str:
    """Run a command, failing the test with its stderr if it fails."""
    proc = subprocess.run([str(a) for a in args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise AssertionError(f"{args} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


def qemu_io(path: Path, fmt: str, *commands: str) -> None:
    """Apply ``qemu-io -c`` commands (writes, zero writes, discards) to an image."""
    args: list[str] = ["qemu-io", "-f", fmt]
    for c in commands:
        args += ["-c", c]
    run(*args, path)


def qemu_raw(path: Path, fmt: str) -> bytes:
    """The disk's bytes according to qemu."""
    out = path.with_name(path.name + ".ref.raw")
    run("qemu-img", "convert", "-f", fmt, "-O", "raw", path, out)
    data = out.read_bytes()
    out.unlink()
    return data


def qemu_size(path: Path, fmt: str) -> int:
    info = json.loads(run("qemu-img", "info", "-f", fmt, "--output=json", path))
    return int(info["virtual-size"])


def pattern_raw(path: Path, size: int, seed: int = 1) -> bytes:
    """A raw disk with data islands, zero gaps and a large unwritten region.

    Data at: the first 300 KiB, an unaligned island around 1 MiB, and the last
    bytes of the disk; the middle (from 1.25 MiB to size - 64 KiB) stays zero
    so tests can check that allocation maps skip it.
    """
    rnd = random.Random(seed)
    buf = bytearray(size)
    buf[0 : 300 * KiB] = rnd.randbytes(300 * KiB)
    buf[1 * MiB - 700 : 1 * MiB + 70 * KiB + 3] = rnd.randbytes(70 * KiB + 703)
    tail = min(size, 3000)
    buf[size - tail :] = rnd.randbytes(tail)
    path.write_bytes(buf)
    return bytes(buf)


def read_all(src: DiskSource, piece: int = MiB) -> bytes:
    return b"".join(src.read(o, min(piece, src.size - o)) for o in range(0, src.size, piece))


def check_source(
    src: DiskSource, ref: bytes, *, sparse_gap: tuple[int, int] | None = None
) -> list[tuple[int, int]]:
    """Assert ``src`` reads exactly ``ref`` and that its allocation map is honest.

    - whole disk in 1 MiB pieces, plus odd unaligned reads, equal ``ref``;
    - extents are sorted, disjoint and inside the disk;
    - every non-zero byte of ``ref`` lies inside an extent;
    - with ``sparse_gap`` (offset, length), no extent touches that range.
    """
    assert src.size == len(ref)
    assert read_all(src) == ref
    rnd = random.Random(len(ref))
    for _ in range(40):
        off = rnd.randrange(0, max(1, len(ref)))
        n = rnd.choice([1, 511, 513, 4095, 65537, 300001])
        n = min(n, len(ref) - off)
        assert src.read(off, n) == ref[off : off + n], (off, n)
    assert src.read(len(ref), 0) == b""
    extents = list(src.allocated_extents())
    pos = 0
    for off, n in extents:
        assert n > 0 and off >= pos and off + n <= src.size, extents
        assert ref[pos:off].count(0) == off - pos, f"non-zero data outside extents in {pos}..{off}"
        pos = off + n
    assert ref[pos:].count(0) == len(ref) - pos, "non-zero data after the last extent"
    if sparse_gap is not None:
        g0, g1 = sparse_gap[0], sparse_gap[0] + sparse_gap[1]
        for off, n in extents:
            assert off + n <= g0 or off >= g1, f"extent {off}+{n} covers unwritten {sparse_gap}"
    return extents


def open_detected(path: Path | str, fmt: str | None = None) -> DiskSource:
    """``open_source`` as ``repofs ingest --backing-dir DIR`` calls it, DIR being the image's own.

    The chains these tests build live in one temporary directory; naming it
    is how an administrator lets a detected image read the files it names.
    """
    return open_source(str(path), fmt, backing_dirs=[os.path.dirname(path)])


def check_against_qemu(
    path: Path,
    qemu_fmt: str,
    format_name: str | None = None,
    *,
    sparse_gap: tuple[int, int] | None = None,
) -> list[tuple[int, int]]:
    """Open ``path`` with our reader and compare everything with qemu."""
    ref = qemu_raw(path, qemu_fmt)
    assert qemu_size(path, qemu_fmt) == len(ref)
    with open_detected(path) as src:
        if format_name is not None:
            assert src.format_name == format_name
        return check_source(src, ref, sparse_gap=sparse_gap)


# -- VHD builder (Microsoft Virtual Hard Disk Image Format Specification) -----


def vhd_checksum(buf: bytes | bytearray) -> int:
    return ~sum(buf) & 0xFFFFFFFF


def vhd_footer(size: int, dtype: int, uid: uuid.UUID, data_offset: int, creator: bytes) -> bytes:
    f = bytearray(512)
    f[0:8] = b"conectix"
    struct.pack_into(
        ">IIQI4sI4s", f, 8, 2, 0x00010000, data_offset, 0, creator, 0x000A0000, b"Wi2k"
    )
    struct.pack_into(">QQHBBI", f, 40, size, size, 65535, 16, 255, dtype)
    f[68:84] = uid.bytes
    struct.pack_into(">I", f, 64, vhd_checksum(f))
    return bytes(f)


def build_vhd(
    path: Path,
    size: int,
    writes: list[tuple[int, bytes]],
    *,
    block_size: int = 2 * MiB,
    parent: tuple[uuid.UUID, dict[bytes, bytes], str] | None = None,
    junk: bool = False,
    uid: uuid.UUID | None = None,
) -> uuid.UUID:
    """Write a dynamic (or, with ``parent``, differencing) VHD.

    ``writes`` are sector-aligned (offset, data) pairs; their sectors get
    bitmap bits set.  ``parent`` is (parent unique id, {platform code:
    locator bytes}, parent unicode name).  With ``junk``, sectors of an
    allocated block that are *not* in the bitmap hold 0xEE bytes, which a
    reader must never return.  Returns the disk's unique id.
    """
    uid = uid or uuid.uuid4()
    dtype = 4 if parent else 3
    nblocks = (size + block_size - 1) // block_size
    bitmap_size = ((block_size // 512 + 7) // 8 + 511) // 512 * 512
    bat_off = 512 + 1024
    bat_len = (nblocks * 4 + 511) // 512 * 512
    pos = bat_off + bat_len
    locators: list[tuple[bytes, int, int]] = []
    loc_blobs = b""
    if parent:
        for code, data in parent[1].items():
            space = (len(data) + 511) // 512 * 512
            locators.append((code, pos + len(loc_blobs), len(data)))
            loc_blobs += data + bytes(space - len(data))
    pos += len(loc_blobs)
    sectors: dict[int, set[int]] = {}
    payload: dict[int, bytearray] = {}
    for off, data in writes:
        assert off % 512 == 0 and len(data) % 512 == 0
        for i in range(0, len(data), 512):
            s = (off + i) // 512
            block, sec = divmod(s * 512, block_size)
            sectors.setdefault(block, set()).add(sec // 512)
            fill = b"\xee" if junk else b"\0"
            buf = payload.setdefault(block, bytearray(fill * block_size))
            buf[sec : sec + 512] = data[i : i + 512]
    bat = [0xFFFFFFFF] * nblocks
    blocks = b""
    for block in sorted(payload):
        bat[block] = (pos + len(blocks)) // 512
        bm = bytearray(bitmap_size)
        for s in sectors[block]:
            bm[s // 8] |= 0x80 >> (s % 8)
        blocks += bytes(bm) + bytes(payload[block])
    hdr = bytearray(1024)
    hdr[0:8] = b"cxsparse"
    struct.pack_into(">QQIII", hdr, 8, 0xFFFFFFFFFFFFFFFF, bat_off, 0x00010000, nblocks, block_size)
    if parent:
        hdr[40:56] = parent[0].bytes
        name = parent[2].encode("utf-16-be")[:510]
        hdr[64 : 64 + len(name)] = name
        for i, (code, off, length) in enumerate(locators):
            struct.pack_into(
                ">4sIIIQ", hdr, 576 + 24 * i, code, (length + 511) // 512, length, 0, off
            )
    struct.pack_into(">I", hdr, 36, vhd_checksum(hdr))
    footer = vhd_footer(size, dtype, uid, 512, b"win ")
    bat_bytes = struct.pack(f">{nblocks}I", *bat) + bytes(bat_len - nblocks * 4)
    path.write_bytes(footer + hdr + bat_bytes + loc_blobs + blocks + footer)
    return uid


# -- VHDX builder (MS-VHDX) ---------------------------------------------------
# The GUIDs come from the reader; images qemu-img writes (tests/ingest/formats/test_vhd.py)
# check them against an independent implementation.


def _with_crc(buf: bytearray, field: int = 4) -> bytes:
    struct.pack_into("<I", buf, field, 0)
    struct.pack_into("<I", buf, field, crc32c(bytes(buf)))
    return bytes(buf)


def vhdx_header(seq: int, data_write: uuid.UUID, log_guid: bytes = bytes(16)) -> bytes:
    h = bytearray(4 * KiB)
    h[0:4] = b"head"
    struct.pack_into("<Q", h, 8, seq)
    h[16:32] = uuid.uuid4().bytes_le
    h[32:48] = data_write.bytes_le
    h[48:64] = log_guid
    struct.pack_into("<HHIQ", h, 64, 0, 1, MiB, MiB)
    return _with_crc(h)


def vhdx_locator(entries: dict[str, str]) -> bytes:
    head = bytearray(20)
    head[0:16] = VHDX_LOCATOR_TYPE.bytes_le
    struct.pack_into("<H", head, 18, len(entries))
    table = b""
    blobs = b""
    base = 20 + 12 * len(entries)
    for key, value in entries.items():
        k, v = key.encode("utf-16-le"), value.encode("utf-16-le")
        koff = base + len(blobs)
        blobs += k
        voff = base + len(blobs)
        blobs += v
        table += struct.pack("<IIHH", koff, voff, len(k), len(v))
    return bytes(head) + table + blobs


def read_data_write_guid(path: Path) -> uuid.UUID:
    """The data write GUID of the current header of a VHDX (what parent_linkage names)."""
    data = path.read_bytes()
    best = max(
        (struct.unpack_from("<Q", data, off + 8)[0], off)
        for off in (64 * KiB, 128 * KiB)
        if data[off : off + 4] == b"head"
    )
    return uuid.UUID(bytes_le=data[best[1] + 32 : best[1] + 48])


def build_vhdx(
    path: Path,
    size: int,
    writes: list[tuple[int, bytes]],
    *,
    block_size: int = MiB,
    lss: int = 512,
    parent: dict[str, str] | None = None,
    states: dict[int, int] | None = None,
    junk: bool = False,
    log_guid: bytes = bytes(16),
) -> uuid.UUID:
    """Write a dynamic (or, with a ``parent`` locator, differencing) VHDX.

    Blocks touched by ``writes`` are FULLY_PRESENT in a dynamic file and
    PARTIALLY_PRESENT (with a sector bitmap) in a differencing one; untouched
    blocks are NOT_PRESENT unless ``states`` overrides them (block -> state,
    e.g. 2 = ZERO, 6 = FULLY_PRESENT from the parent's point of view).  With
    ``junk``, unwritten sectors of a partially present block hold 0xEE.
    Returns the data write GUID (for a child's parent_linkage).
    """
    data_write = uuid.uuid4()
    chunk_ratio = (1 << 23) * lss // block_size
    nblocks = (size + block_size - 1) // block_size
    if parent:
        nentries = (nblocks + chunk_ratio - 1) // chunk_ratio * (chunk_ratio + 1)
    else:
        nentries = nblocks + (nblocks - 1) // chunk_ratio
    bat_len = (nentries * 8 + MiB - 1) // MiB * MiB
    meta_off, bat_off = 2 * MiB, 3 * MiB
    pos = bat_off + bat_len
    sectors: dict[int, set[int]] = {}
    payload: dict[int, bytearray] = {}
    for off, data in writes:
        assert off % lss == 0 and len(data) % lss == 0
        for i in range(0, len(data), lss):
            block, inb = divmod(off + i, block_size)
            sectors.setdefault(block, set()).add(inb // lss)
            fill = b"\xee" if junk else b"\0"
            buf = payload.setdefault(block, bytearray(fill * block_size))
            buf[inb : inb + lss] = data[i : i + lss]
    bat = [0] * nentries
    blobs: list[tuple[int, bytes]] = []
    for block in sorted(payload):
        bat[block + block // chunk_ratio] = (pos // MiB) << 20 | (7 if parent else 6)
        blobs.append((pos, bytes(payload[block])))
        pos += block_size
    for block, state in (states or {}).items():
        bat[block + block // chunk_ratio] = state
    if parent:
        chunks: dict[int, bytearray] = {}
        for block, secs in sectors.items():
            chunk = block // chunk_ratio
            bm = chunks.setdefault(chunk, bytearray(MiB))
            base = (block % chunk_ratio) * (block_size // lss)
            for s in secs:
                bm[(base + s) // 8] |= 1 << ((base + s) % 8)
        for chunk, bm in sorted(chunks.items()):
            bat[chunk * (chunk_ratio + 1) + chunk_ratio] = (pos // MiB) << 20 | 6
            blobs.append((pos, bytes(bm)))
            pos += MiB
    out = bytearray(pos)
    out[0:8] = b"vhdxfile"
    out[64 * KiB : 68 * KiB] = vhdx_header(1, data_write, log_guid)
    out[128 * KiB : 132 * KiB] = vhdx_header(2, data_write, log_guid)
    region = bytearray(64 * KiB)
    region[0:4] = b"regi"
    struct.pack_into("<I", region, 8, 2)
    region[16:32] = BAT_GUID.bytes_le
    struct.pack_into("<QII", region, 32, bat_off, bat_len, 1)
    region[48:64] = METADATA_GUID.bytes_le
    struct.pack_into("<QII", region, 64, meta_off, MiB, 1)
    region_bytes = _with_crc(region)
    out[192 * KiB : 256 * KiB] = region_bytes
    out[256 * KiB : 320 * KiB] = region_bytes
    items = [
        (FILE_PARAMS, struct.pack("<II", block_size, 2 if parent else 0), 4),
        (DISK_SIZE, struct.pack("<Q", size), 6),
        (DISK_ID, uuid.uuid4().bytes_le, 6),
        (LOGICAL_SECTOR, struct.pack("<I", lss), 6),
        (PHYSICAL_SECTOR, struct.pack("<I", 4096), 6),
    ]
    if parent:
        items.append((PARENT_LOCATOR, vhdx_locator(parent), 4))
    table = bytearray(64 * KiB)
    table[0:8] = b"metadata"
    struct.pack_into("<H", table, 10, len(items))
    ioff = 64 * KiB
    for i, (guid, data, flags) in enumerate(items):
        table[32 + 32 * i : 48 + 32 * i] = guid.bytes_le
        struct.pack_into("<III", table, 48 + 32 * i, ioff, len(data), flags)
        out[meta_off + ioff : meta_off + ioff + len(data)] = data
        ioff += (len(data) + 7) // 8 * 8
    out[meta_off : meta_off + 64 * KiB] = table
    out[bat_off : bat_off + nentries * 8] = struct.pack(f"<{nentries}Q", *bat)
    for off, data in blobs:
        out[off : off + len(data)] = data
    path.write_bytes(out)
    return data_write


# Fuzzed images are written to tmpfs where there is one. On disk, writing one could wait
# for the writeback of the gigabytes earlier tests left dirty; a VHD fuzz example once
# took over its 5 s deadline in CI, where 6,000 examples run alone all took under 0.8 s.
FUZZ_SCRATCH = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None


def exercise(data: bytes, fmt: str | None) -> None:
    """Open, map and read a (possibly hostile) image; only SourceError may escape."""
    with tempfile.TemporaryDirectory(dir=FUZZ_SCRATCH) as d:
        path = os.path.join(d, "fuzz.img")
        with open(path, "wb") as f:
            f.write(data)
        tracemalloc.start()
        try:
            with open_source(path, fmt) as src:
                list(islice(src.allocated_extents(), 5000))
                for off in (0, 4096, src.size // 2, max(0, src.size - 70000)):
                    n = min(65536 + 17, src.size - off)
                    if n > 0:
                        assert len(src.read(off, n)) == n
        except SourceError as exc:
            assert "\n" not in str(exc)
        finally:
            _, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
        assert peak < 96 * MiB, peak


def patch(path: Path, offset: int, data: bytes) -> None:
    """Overwrite bytes of a file in place (to build a broken image)."""
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)
