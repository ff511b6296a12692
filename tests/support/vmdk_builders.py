"""Writers for VMDK files that qemu-img can read but not create, built from the specs.

- COWD (ESX vmfsSparse deltas): VMware "Virtual Disk Format 1.1", "ESX Server
  Sparse Extents".
- SEsparse (ESXi 6.5+ deltas): the layout documented in qemu's block driver,
  with ESXi's customary offsets (journal at 1 MiB, grain directory at 8 MiB).
- streamOptimized the way VMware writes it (grain directory at the end, a
  footer and markers), which qemu-img convert never produces.

These are test fixtures: they favour plain code over speed and write small
files.  qemu-img is the reference reader for everything they produce.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable

SECTOR = 512


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def descriptor(
    create_type: str,
    extents: list[str],
    *,
    cid: int = 0x1234ABCD,
    parent_cid: int = 0xFFFFFFFF,
    parent_hint: str | None = None,
    extra: str = "",
) -> str:
    """A text descriptor like ESXi and Workstation write."""
    lines = [
        "# Disk DescriptorFile",
        "version=1",
        'encoding="UTF-8"',
        f"CID={cid:08x}",
        f"parentCID={parent_cid:08x}",
        'isNativeSnapshot="no"',
        f'createType="{create_type}"',
    ]
    if parent_hint is not None:
        lines.append(f'parentFileNameHint="{parent_hint}"')
    lines += ["", "# Extent description", *extents, "", "# The Disk Data Base", "#DDB", ""]
    lines += ['ddb.adapterType = "lsilogic"', 'ddb.virtualHWVersion = "14"']
    return "\n".join(lines) + "\n" + extra


def write_cowd(
    path: str,
    capacity: int,
    grain: int,
    grains: dict[int, bytes],
    *,
    gd_entries: int | None = None,
    parent_name: str = "",
) -> None:
    """Write a COWD extent of ``capacity`` sectors; ``grains`` maps grain index to data."""
    gt_entries = 4096
    n_tables = ceil_div(capacity, grain * gt_entries)
    gd_offset = 4
    gd_sectors = ceil_div(n_tables * 4, SECTOR)
    used_tables = sorted({g // gt_entries for g in grains})
    table_sector = {}
    pos = gd_offset + gd_sectors
    for t in used_tables:
        table_sector[t] = pos
        pos += gt_entries * 4 // SECTOR
    grain_sector = {}
    for g in sorted(grains, reverse=True):  # data in reverse order: pointers must be followed
        grain_sector[g] = pos
        pos += grain
    union = parent_name.encode().ljust(1024, b"\0") + struct.pack("<I", 0)
    header = struct.pack(
        "<4sIIIIIII", b"COWD", 1, 3, capacity, grain, gd_offset,
        n_tables if gd_entries is None else gd_entries, pos,
    )
    header += union + struct.pack("<I", 1) + b"delta".ljust(60, b"\0") + bytes(512)
    header += struct.pack("<I", 1) + bytes(8) + struct.pack("<I", 0)
    header = header.ljust(2048, b"\0")
    out = bytearray(pos * SECTOR)
    out[0:2048] = header
    gd = [table_sector.get(t, 0) for t in range(n_tables)]
    out[gd_offset * SECTOR : gd_offset * SECTOR + n_tables * 4] = struct.pack(f"<{n_tables}I", *gd)
    for g, data in grains.items():
        t, i = divmod(g, gt_entries)
        struct.pack_into("<I", out, table_sector[t] * SECTOR + i * 4, grain_sector[g])
        assert len(data) <= grain * SECTOR
        out[grain_sector[g] * SECTOR : grain_sector[g] * SECTOR + len(data)] = data
    with open(path, "wb") as f:
        f.write(out)


SESPARSE_UNMAPPED = 1
SESPARSE_ZERO = 2


def write_sesparse(
    path: str,
    capacity: int,
    grains: dict[int, bytes | int],
    *,
    replay_journal: int = 0,
    gd_override: dict[int, int] | None = None,
) -> None:
    """Write an SEsparse extent of ``capacity`` sectors.

    ``grains`` maps a 4 KiB grain index to its data, or to
    :data:`SESPARSE_ZERO` / :data:`SESPARSE_UNMAPPED` for grains that read as
    zeros.  Tables and grains are placed in reverse order so that a reader
    which assumes identity mapping fails.
    """
    grain_sectors, gt_sectors = 8, 64
    gt_entries = gt_sectors * SECTOR // 8
    n_tables = ceil_div(capacity, grain_sectors * gt_entries)
    vol_off, jh_off, jh_size, j_off, j_size = 1, 2, 2, 0x800, 0x3800
    gd_off = 0x4000
    gd_size = ceil_div(n_tables * 8, SECTOR)
    gt_off = gd_off + gd_size
    gt_size = n_tables * gt_sectors
    fb_off, fb_size = gt_off + gt_size, 1
    bm_off, bm_size = fb_off + fb_size, gt_size
    grains_off = bm_off + bm_size
    allocated = sorted((g for g, v in grains.items() if isinstance(v, bytes)), reverse=True)
    grain_index = {g: i for i, g in enumerate(allocated)}
    grains_size = len(allocated) * grain_sectors
    const = struct.pack(
        "<26Q", 0xCAFEBABE, 0x200000001, capacity, grain_sectors, gt_sectors, 0, 0, 0, 0, 0,
        vol_off, 1, jh_off, jh_size, j_off, j_size, gd_off, gd_size, gt_off, gt_size,
        fb_off, fb_size, bm_off, bm_size, grains_off, grains_size,
    ).ljust(SECTOR, b"\0")
    volatile = struct.pack("<4Q", 0xCAFECAFE, 0, 1, replay_journal).ljust(SECTOR, b"\0")
    used_tables = sorted({g // gt_entries for g in grains}, reverse=True)
    slot = {t: n for n, t in enumerate(used_tables)}
    end = (grains_off + grains_size) * SECTOR
    with open(path, "wb") as f:
        f.truncate(max(end, (grains_off) * SECTOR))
        f.seek(0)
        f.write(const + volatile)
        gd = [(0x10000000 << 32) | slot[t] if t in slot else 0 for t in range(n_tables)]
        for t, value in (gd_override or {}).items():
            gd[t] = value
        f.seek(gd_off * SECTOR)
        f.write(struct.pack(f"<{n_tables}Q", *gd))
        tables = {t: [0] * gt_entries for t in used_tables}
        for g, value in grains.items():
            t, i = divmod(g, gt_entries)
            if isinstance(value, bytes):
                idx = grain_index[g]
                tables[t][i] = (3 << 60) | ((idx & 0xFFF) << 48) | (idx >> 12)
                f.seek((grains_off + idx * grain_sectors) * SECTOR)
                f.write(value.ljust(grain_sectors * SECTOR, b"\0"))
            else:
                tables[t][i] = value << 60
        for t, entries in tables.items():
            f.seek((gt_off + slot[t] * gt_sectors) * SECTOR)
            f.write(struct.pack(f"<{gt_entries}Q", *entries))


def sparse_header(
    *,
    capacity: int,
    grain: int,
    desc_offset: int,
    desc_size: int,
    gd_offset: int,
    overhead: int,
    flags: int,
    compress: int,
    version: int = 3,
    rgd_offset: int = 0,
    gtes: int = 512,
) -> bytes:
    """A 512-byte hosted sparse (KDMV) header."""
    return struct.pack(
        "<4sIIQQQQIQQQB4sH", b"KDMV", version, flags, capacity, grain, desc_offset, desc_size,
        gtes, rgd_offset, gd_offset, overhead, 0, b"\n \r\n", compress,
    ).ljust(SECTOR, b"\0")


GD_AT_END = 0xFFFFFFFFFFFFFFFF

#: ``(grain_index, uncompressed grain) -> (lba in sectors, compressed payload)``
GrainTamper = Callable[[int, bytes], tuple[int, bytes]]


def write_stream_optimized(
    path: str,
    raw: bytes,
    *,
    name: str = "disk.vmdk",
    grain: int = 128,
    tamper: GrainTamper | None = None,
    markers: bool = True,
) -> None:
    """Write ``raw`` as a VMware-style streamOptimized file (GD at the end, footer).

    All-zero grains are left out, as VMware does.  The last grain is padded to
    a full grain before compressing.  Without ``markers`` each grain is a
    bare zlib stream (the header then lacks the markers flag).
    """
    capacity = ceil_div(len(raw), SECTOR)
    gbytes = grain * SECTOR
    n_grains = ceil_div(capacity, grain)
    n_tables = ceil_div(n_grains, 512)
    desc = descriptor("streamOptimized", [f'RW {capacity} SPARSE "{name}"']).encode()
    desc_size = 20
    assert len(desc) <= desc_size * SECTOR
    overhead = 128
    flags = 0x30001 if markers else 0x10001

    def header(gd_offset: int) -> bytes:
        return sparse_header(
            capacity=capacity, grain=grain, desc_offset=1, desc_size=desc_size,
            gd_offset=gd_offset, overhead=overhead, flags=flags, compress=1,
        )

    out = bytearray(overhead * SECTOR)
    out[0:SECTOR] = header(GD_AT_END)
    out[SECTOR : SECTOR + len(desc)] = desc
    gtes = [0] * (n_tables * 512)
    for g in range(n_grains):
        chunk = raw[g * gbytes : (g + 1) * gbytes]
        if not any(chunk):
            continue
        chunk = chunk.ljust(gbytes, b"\0")
        lba, payload = (g * grain, zlib.compress(chunk)) if tamper is None else tamper(g, chunk)
        gtes[g] = len(out) // SECTOR
        rec = struct.pack("<QI", lba, len(payload)) + payload if markers else payload
        out += rec.ljust(ceil_div(len(rec), SECTOR) * SECTOR, b"\0")
    gd = []
    for t in range(n_tables):
        table = gtes[t * 512 : (t + 1) * 512]
        if not any(table):
            gd.append(0)
            continue
        out += struct.pack("<QII", 4, 0, 1).ljust(SECTOR, b"\0")  # grain table marker
        gd.append(len(out) // SECTOR)
        out += struct.pack("<512I", *table)
    gd_sectors = ceil_div(n_tables * 4, SECTOR)
    out += struct.pack("<QII", gd_sectors, 0, 2).ljust(SECTOR, b"\0")  # grain directory marker
    gd_offset = len(out) // SECTOR
    out += struct.pack(f"<{n_tables}I", *gd).ljust(gd_sectors * SECTOR, b"\0")
    out += struct.pack("<QII", 1, 0, 3).ljust(SECTOR, b"\0")  # footer marker
    out += header(gd_offset)
    out += bytes(SECTOR)  # end-of-stream marker
    with open(path, "wb") as f:
        f.write(out)


def write_mkimg_sparse(path: str, raw: bytes, *, grain: int = 128) -> None:
    """Write ``raw`` as a monolithicSparse VMDK laid out the way FreeBSD's mkimg writes one.

    mkimg (usr.bin/mkimg/vmdk.c) writes a version 1 header with the
    newline-test and redundant-GD flags, then an embedded descriptor whose
    CID is 0 and whose one extent line names the file ``""``, then the
    grain directory and its tables, the redundant copy of both, and the
    grains that hold data, in disk order.  ``raw`` is a whole number of grains.
    """
    capacity = len(raw) // SECTOR
    assert capacity % grain == 0 and len(raw) % SECTOR == 0
    desc = (
        "# Disk DescriptorFile\n"
        "version=1\n"
        "CID=00000000\n"
        "parentCID=ffffffff\n"
        'createType="monolithicSparse"\n'
        "# Extent description\n"
        f'RW {capacity} SPARSE ""\n'
        "# The Disk Data Base\n"
        "#DDB\n"
        'ddb.adapterType = "ide"\n'
        f'ddb.geometry.cylinders = "{max(1, capacity // (16 * 63))}"\n'
        'ddb.geometry.heads = "16"\n'
        'ddb.geometry.sectors = "63"\n'
    ).encode()
    desc_len = ceil_div(len(desc), SECTOR) * SECTOR
    n_grains = capacity // grain
    n_tables = ceil_div(n_grains, 512)
    gd_sectors = ceil_div(n_tables * 4, SECTOR)
    sec = 1 + desc_len // SECTOR
    gd_offset = sec
    sec += gd_sectors
    gd = [sec + 4 * t for t in range(n_tables)]
    sec += 4 * n_tables
    rgd_offset = sec
    sec += gd_sectors
    rgd = [sec + 4 * t for t in range(n_tables)]
    sec += 4 * n_tables
    overhead = ceil_div(sec, grain) * grain
    gbytes = grain * SECTOR
    gtes = [0] * (n_tables * 512)
    grains = []
    cur = overhead
    for g in range(n_grains):
        chunk = raw[g * gbytes : (g + 1) * gbytes]
        if any(chunk):
            gtes[g] = cur
            cur += grain
            grains.append(chunk)
    header = sparse_header(
        capacity=capacity, grain=grain, desc_offset=1, desc_size=desc_len // SECTOR,
        gd_offset=gd_offset, overhead=overhead, flags=0x3, compress=0, version=1,
        rgd_offset=rgd_offset,
    )
    tables = struct.pack(f"<{len(gtes)}I", *gtes)
    out = bytearray(header + desc.ljust(desc_len, b"\0"))
    out += struct.pack(f"<{n_tables}I", *gd).ljust(gd_sectors * SECTOR, b"\0") + tables
    out += struct.pack(f"<{n_tables}I", *rgd).ljust(gd_sectors * SECTOR, b"\0") + tables
    out = out.ljust(overhead * SECTOR, b"\0")
    for chunk in grains:
        out += chunk
    with open(path, "wb") as f:
        f.write(out)
