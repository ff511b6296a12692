"""VHD and VHDX reader tests.

Fixed and dynamic images come from real ``qemu-img`` and are compared with
``qemu-img convert -f vpc|vhdx -O raw``.  qemu 7.2 can create neither VHD nor
VHDX differencing disks (and refuses to open differencing VHDX), so those are
written by the spec-based builders in ``_imgfmt_helpers``; the builders'
non-differencing output is itself checked against qemu first, and the
differencing tests compare with an expectation computed from the parent's
qemu bytes overlaid with what the child wrote.
"""

from __future__ import annotations

import os
import random
import struct
import uuid
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ingest.formats import vhd as vhdmod
from ingest.formats.detect import detect_format, open_source
from ingest.formats.vhdx import crc32c
from repofs.errors import SourceError
from tests.support.imgfmt import (
    KiB,
    MiB,
    build_vhd,
    build_vhdx,
    check_against_qemu,
    check_source,
    exercise,
    open_detected,
    patch,
    pattern_raw,
    qemu_io,
    qemu_raw,
    read_all,
    read_data_write_guid,
    requires_qemu,
    run,
    vhd_checksum,
)

pytestmark = requires_qemu

SIZE = 5 * MiB + 1536
GAP = (2 * MiB, 2 * MiB)

FUZZ = settings(
    max_examples=100,
    deadline=5000,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("vhd")
    pattern_raw(d / "pattern.raw", SIZE)
    return d


def fails(path: Path, match: str, fmt: str | None = None, *, names: Path | None = None) -> None:
    """Opening, mapping and reading ``path`` is a one-line SourceError naming the file."""
    with pytest.raises(SourceError, match=match) as info:
        src = open_detected(path, fmt)
        try:
            list(src.allocated_extents())
            read_all(src)
        finally:
            src.close()
    assert str(names or path) in str(info.value)
    assert "\n" not in str(info.value)


def overlay(base: bytes, writes: list[tuple[int, bytes]], size: int | None = None) -> bytes:
    out = bytearray(base[:size] if size is not None else base)
    if size is not None and len(out) < size:
        out += bytes(size - len(out))
    for off, data in writes:
        out[off : off + len(data)] = data
    return bytes(out)


def sector_writes(seed: int, size: int, sector: int = 512) -> list[tuple[int, bytes]]:
    """Scattered sector-aligned writes: single sectors, runs across a block border, the tail."""
    rnd = random.Random(seed)
    writes = [
        (0, rnd.randbytes(sector)),
        (7 * sector, rnd.randbytes(3 * sector)),
        (1 * MiB - 2 * sector, rnd.randbytes(5 * sector)),
        (size - sector, rnd.randbytes(sector)),
    ]
    return [(o, d) for o, d in writes if o + len(d) <= size]


# -- VHD: images qemu makes --------------------------------------------------------


@pytest.mark.parametrize("sub", ["fixed", "dynamic"])
def test_vhd_convert_matches_qemu(work: Path, sub: str) -> None:
    img = work / f"conv-{sub}.vhd"
    run("qemu-img", "convert", "-O", "vpc", "-o", f"subformat={sub}", work / "pattern.raw", img)
    assert detect_format(str(img), img.read_bytes()[:4096]) == "vhd"
    check_against_qemu(img, "vpc", f"vhd:{sub}", sparse_gap=GAP)


@pytest.mark.parametrize("sub", ["fixed", "dynamic"])
def test_vhd_force_size_uses_current_size(work: Path, sub: str) -> None:
    """'qem2' images (force_size) keep the exact size instead of a CHS-rounded one."""
    img = work / f"force-{sub}.vhd"
    run(
        "qemu-img",
        "convert",
        "-O",
        "vpc",
        "-o",
        f"subformat={sub},force_size=on",
        work / "pattern.raw",
        img,
    )
    check_against_qemu(img, "vpc", f"vhd:{sub}", sparse_gap=GAP)
    with open_detected(img) as src:
        assert src.size == SIZE


def test_vhd_sparse_dynamic_with_writes(tmp_path: Path) -> None:
    img = tmp_path / "sparse.vhd"
    run("qemu-img", "create", "-q", "-f", "vpc", img, "12M")
    qemu_io(img, "vpc", "write -P 0x11 0 4k", "write -P 0x22 6M 1000", "write -P 0x33 11M 64k")
    ext = check_against_qemu(img, "vpc", "vhd:dynamic", sparse_gap=(2 * MiB, 4 * MiB))
    assert sum(n for _o, n in ext) <= 3 * 2 * MiB


def test_vhd_virtual_size_rule() -> None:
    """qemu's size rule: CHS geometry unless the creator trusts current_size or CHS is maximal."""
    foot = {"current_size": 10 * MiB, "chs": 20000}
    assert vhdmod.virtual_size({**foot, "creator_app": b"vpc "}) == 20000 * 512
    assert vhdmod.virtual_size({**foot, "creator_app": b"qemu"}) == 20000 * 512
    for creator in (b"win ", b"qem2", b"d2v ", b"CTXS", b"tap\0"):
        assert vhdmod.virtual_size({**foot, "creator_app": creator}) == 10 * MiB
    big = {"current_size": 200 * 1024**3, "chs": 65535 * 16 * 255, "creator_app": b"vpc "}
    assert vhdmod.virtual_size(big) == 200 * 1024**3


# -- VHD: spec-built dynamic and differencing disks ---------------------------------


def test_vhd_builder_agrees_with_qemu(tmp_path: Path) -> None:
    """Our builder's dynamic VHD reads the same in qemu: the builder follows the layout."""
    img = tmp_path / "built.vhd"
    writes = sector_writes(1, 6 * MiB)
    build_vhd(img, 6 * MiB, writes)
    ref = check_against_qemu(img, "vpc", "vhd:dynamic")
    assert ref
    with open_detected(img) as src:
        assert read_all(src) == overlay(bytes(6 * MiB), writes)


def vhd_uuid(path: Path) -> uuid.UUID:
    return uuid.UUID(bytes=path.read_bytes()[-512 + 68 : -512 + 84])


@pytest.fixture(scope="module")
def vhd_parent(work: Path) -> tuple[Path, bytes]:
    parent = work / "parent.vhd"
    run("qemu-img", "convert", "-O", "vpc", "-o", "force_size=on", work / "pattern.raw", parent)
    return parent, qemu_raw(parent, "vpc")


@pytest.mark.parametrize(
    "locators",
    [
        {b"W2ru": ".\\parent.vhd", b"W2ku": "C:\\VMs\\parent.vhd"},
        {b"W2ku": "D:\\Hyper-V\\parent.vhd"},
        {b"MacX": "ABS"},
        {},
    ],
    ids=["W2ru", "W2ku-basename", "MacX", "unicode-name-only"],
)
def test_vhd_differencing(
    tmp_path: Path, vhd_parent: tuple[Path, bytes], locators: dict[bytes, str]
) -> None:
    """Expectation: parent bytes (from qemu) overlaid with the child's sectors.

    Sectors of allocated child blocks whose bitmap bit is clear hold 0xEE
    junk and must come from the parent instead.
    """
    parent_src, parent_bytes = vhd_parent
    parent = tmp_path / "parent.vhd"
    parent.write_bytes(parent_src.read_bytes())
    encoded = {}
    for code, name in locators.items():
        if code == b"MacX":
            encoded[code] = f"file://{parent}".encode()
        else:
            encoded[code] = name.encode("utf-16-le")
    child = tmp_path / "child.vhd"
    writes = sector_writes(2, SIZE)
    build_vhd(child, SIZE, writes, parent=(vhd_uuid(parent), encoded, "parent.vhd"), junk=True)
    assert detect_format(str(child), child.read_bytes()[:4096]) == "vhd"
    with open_detected(child) as src:
        assert src.format_name == "vhd:differencing"
        assert src.chain() == [str(child), str(parent)]
        ext = check_source(src, overlay(parent_bytes, writes), sparse_gap=GAP)
    assert ext


def test_vhd_two_level_differencing_in_subdirs(tmp_path: Path, vhd_parent) -> None:
    """base/parent.vhd <- mid/mid.vhd <- top.vhd, found through relative W2ru locators."""
    parent_src, parent_bytes = vhd_parent
    (tmp_path / "base").mkdir()
    (tmp_path / "mid").mkdir()
    parent = tmp_path / "base" / "parent.vhd"
    parent.write_bytes(parent_src.read_bytes())
    mid = tmp_path / "mid" / "mid.vhd"
    w1 = sector_writes(3, SIZE)
    loc1 = {b"W2ru": "..\\base\\parent.vhd".encode("utf-16-le")}
    mid_id = build_vhd(mid, SIZE, w1, parent=(vhd_uuid(parent), loc1, "parent.vhd"), junk=True)
    top = tmp_path / "top.vhd"
    w2 = [(512 * 9, b"\x42" * 1024), (4 * MiB, b"\x43" * 4096)]
    loc2 = {b"W2ru": ".\\mid\\mid.vhd".encode("utf-16-le")}
    build_vhd(top, SIZE, w2, parent=(mid_id, loc2, "mid.vhd"))
    with open_detected(top) as src:
        assert src.chain() == [str(top), str(mid), str(parent)]
        check_source(src, overlay(overlay(parent_bytes, w1), w2), sparse_gap=GAP)


def test_vhd_parent_uuid_mismatch(tmp_path: Path, vhd_parent) -> None:
    parent = tmp_path / "parent.vhd"
    parent.write_bytes(vhd_parent[0].read_bytes())
    child = tmp_path / "child.vhd"
    loc = {b"W2ru": ".\\parent.vhd".encode("utf-16-le")}
    build_vhd(child, SIZE, [], parent=(uuid.uuid4(), loc, "parent.vhd"))
    with pytest.raises(SourceError, match="unique id") as info:
        open_detected(child)
    assert str(child) in str(info.value) and str(parent) in str(info.value)


def test_vhd_parent_missing_loop_and_wrong_format(tmp_path: Path, work: Path) -> None:
    child = tmp_path / "child.vhd"
    loc = {b"W2ru": ".\\gone.vhd".encode("utf-16-le")}
    build_vhd(child, SIZE, [], parent=(uuid.uuid4(), loc, "gone.vhd"))
    fails(child, "parent VHD not found .*gone.vhd")
    loc = {b"W2ru": ".\\child.vhd".encode("utf-16-le")}
    build_vhd(child, SIZE, [], parent=(uuid.uuid4(), loc, "child.vhd"))
    fails(child, "chain loops")
    raw = tmp_path / "raw.vhd"
    raw.write_bytes(bytes(SIZE))
    loc = {b"W2ru": ".\\raw.vhd".encode("utf-16-le")}
    build_vhd(child, SIZE, [], parent=(uuid.uuid4(), loc, "raw.vhd"))
    fails(child, "is a raw image, not a VHD")


# -- VHD: bad input -----------------------------------------------------------------


@pytest.fixture()
def dyn(tmp_path: Path) -> Path:
    img = tmp_path / "victim.vhd"
    build_vhd(img, 6 * MiB, sector_writes(4, 6 * MiB))
    return img


def patch_dyn_header(path: Path, offset: int, value: bytes) -> None:
    """Change a dynamic header field and re-seal its checksum (a structurally 'valid' lie)."""
    data = bytearray(path.read_bytes())
    data[512 + offset : 512 + offset + len(value)] = value
    hdr = data[512:1536]
    hdr[36:40] = bytes(4)
    struct.pack_into(">I", hdr, 36, vhd_checksum(hdr))
    data[512:1536] = hdr
    path.write_bytes(data)


def test_vhd_bad_footer(dyn: Path, tmp_path: Path) -> None:
    patch(dyn, 100, b"\x01")  # breaks both the checksum of the copy at 0 ...
    size = dyn.stat().st_size
    patch(dyn, size - 512 + 100, b"\x01")  # ... and of the footer at the end
    fails(dyn, "checksum", "vhd")
    junk = tmp_path / "junk.vhd"
    junk.write_bytes(random.Random(1).randbytes(4096))
    fails(junk, "not a VHD", "vhd")
    tiny = tmp_path / "tiny.vhd"
    tiny.write_bytes(b"conectix")
    fails(tiny, "too small", "vhd")


def test_vhd_damaged_footer_copy_is_still_a_vhd(dyn: Path) -> None:
    """Damage at offset 0 made a dynamic VHD "raw": its container bytes were stored, no error.

    The footer at the end still says what the file is, as for a fixed VHD.
    """
    with open_detected(dyn) as src:
        before = read_all(src)
    patch(dyn, 4, os.urandom(200))
    assert detect_format(str(dyn), dyn.read_bytes()[:4096]) == "vhd"
    with open_detected(dyn) as src:
        assert src.format_name == "vhd:dynamic" and read_all(src) == before


@pytest.mark.parametrize(
    ("offset", "value", "match"),
    [
        (0, b"cxsparsX", "bad cookie"),
        (16, struct.pack(">Q", 1 << 40), "past the end"),
        (28, struct.pack(">I", 1), "BAT has 1 entries"),
        (32, struct.pack(">I", 3000), "absurd block size"),
        (32, struct.pack(">I", 1 << 30), "absurd block size"),
    ],
)
def test_vhd_bad_dynamic_header(dyn: Path, offset: int, value: bytes, match: str) -> None:
    patch_dyn_header(dyn, offset, value)
    fails(dyn, match)


def test_vhd_bad_header_checksum_and_offset(dyn: Path, tmp_path: Path) -> None:
    patch(dyn, 512 + 40, b"\x01")
    fails(dyn, "header checksum")
    img = tmp_path / "off.vhd"
    build_vhd(img, 6 * MiB, [])
    data = bytearray(img.read_bytes())
    for base in (0, len(data) - 512):
        struct.pack_into(">Q", data, base + 16, 1 << 40)
        struct.pack_into(">I", data, base + 64, 0)
        struct.pack_into(">I", data, base + 64, vhd_checksum(data[base : base + 512]))
    img.write_bytes(bytes(data))
    fails(img, "dynamic header offset")


def test_vhd_bat_entry_past_eof_and_overlap(dyn: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy.vhd"
    copy.write_bytes(dyn.read_bytes())
    patch(dyn, 1536, struct.pack(">I", 0x7FFFFFFF))
    fails(dyn, "BAT entry for block 0 points to offset")
    first = copy.read_bytes()[1536:1540]
    patch(copy, 1540, first)
    patch(copy, 1544, first)
    fails(copy, "blocks overlap")


def test_vhd_truncated(dyn: Path) -> None:
    os.truncate(dyn, dyn.stat().st_size - 700 * KiB)
    fails(dyn, "past the end|truncated")


@FUZZ
@given(
    seed=st.sampled_from(["dyn", "diff", "fixed"]),
    edits=st.lists(st.tuples(st.integers(0, 4096), st.binary(min_size=1, max_size=8)), max_size=6),
    reseal=st.booleans(),
    cut=st.none() | st.integers(0, 9000),
)
def test_vhd_mutations_only_raise_source_error(
    vhd_fuzz_seeds: dict[str, bytes], seed: str, edits, reseal: bool, cut: int | None
) -> None:
    data = bytearray(vhd_fuzz_seeds[seed])
    if seed == "fixed":  # the interesting bytes are the footer at the end
        base = len(data) - 512
        edits = [(base + p % 512, b) for p, b in edits]
    for pos, blob in edits:
        data[pos : pos + len(blob)] = blob
    if reseal and seed != "fixed":
        hdr = data[512:1536]
        hdr[36:40] = bytes(4)
        struct.pack_into(">I", hdr, 36, vhd_checksum(hdr))
        data[512:1536] = hdr
    if reseal:
        base = 0 if seed != "fixed" else len(data) - 512
        foot = data[base : base + 512]
        foot[64:68] = bytes(4)
        struct.pack_into(">I", foot, 64, vhd_checksum(foot))
        data[base : base + 512] = foot
    if cut is not None:
        del data[cut:]
    exercise(bytes(data), "vhd")


@pytest.fixture(scope="module")
def vhd_fuzz_seeds(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    d = tmp_path_factory.mktemp("vhdfuzz")
    build_vhd(d / "p.vhd", 3 * MiB, sector_writes(5, 3 * MiB), block_size=512 * KiB)
    parent_id = vhd_uuid(d / "p.vhd")
    loc = {b"W2ru": ".\\p.vhd".encode("utf-16-le")}
    build_vhd(
        d / "c.vhd",
        3 * MiB,
        sector_writes(6, 3 * MiB),
        block_size=512 * KiB,
        parent=(parent_id, loc, "p.vhd"),
    )
    raw = d / "r.raw"
    raw.write_bytes(random.Random(2).randbytes(MiB))
    run("qemu-img", "convert", "-O", "vpc", "-o", "subformat=fixed", raw, d / "f.vhd")
    return _Seeds(
        dyn=(d / "p.vhd").read_bytes(),
        diff=(d / "c.vhd").read_bytes(),
        fixed=(d / "f.vhd").read_bytes(),
    )


class _Seeds(dict):
    """The seed images, with a short repr: Hypothesis prints a failing example's
    arguments, and these are megabytes (a 20 MB repr, itself an error under -W error)."""

    def __repr__(self) -> str:
        return f"<VHD seed images {', '.join(self)}>"


# -- VHDX: images qemu makes ---------------------------------------------------------


def test_crc32c_known_answers() -> None:
    assert crc32c(b"") == 0
    assert crc32c(b"123456789") == 0xE3069283
    assert crc32c(bytes(32)) == 0x8A9136AA
    assert crc32c(b"\xff" * 32) == 0x62A8AB43


def bytewise_crc32c(data: bytes) -> int:
    """The textbook bit-at-a-time CRC-32C, to check the table/zero-run version against."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
    return crc ^ 0xFFFFFFFF


@settings(max_examples=60, deadline=None, database=None)
@given(parts=st.lists(st.binary(max_size=300) | st.integers(0, 3000).map(bytes), max_size=6))
def test_crc32c_matches_bitwise_reference(parts: list[bytes]) -> None:
    data = b"".join(parts)
    assert crc32c(data) == bytewise_crc32c(data)


@pytest.mark.parametrize(
    ("sub", "block"), [("dynamic", None), ("dynamic", "1M"), ("dynamic", "8M"), ("fixed", "2M")]
)
def test_vhdx_convert_matches_qemu(work: Path, sub: str, block: str | None) -> None:
    img = work / f"conv-{sub}-{block}.vhdx"
    opts = f"subformat={sub}" + (f",block_size={block}" if block else "")
    run("qemu-img", "convert", "-O", "vhdx", "-o", opts, work / "pattern.raw", img)
    assert detect_format(str(img), img.read_bytes()[:4096]) == "vhdx"
    gap = GAP if block != "8M" else None  # an 8 MiB block covers the whole small disk
    check_against_qemu(img, "vhdx", f"vhdx:{sub}", sparse_gap=gap)


def test_vhdx_sparse_with_writes(tmp_path: Path) -> None:
    img = tmp_path / "sparse.vhdx"
    run("qemu-img", "create", "-q", "-f", "vhdx", "-o", "block_size=1M", img, "12M")
    qemu_io(
        img,
        "vhdx",
        "write -P 0x11 0 4k",
        "write -P 0x22 6M 1000",
        "write -z 7M 512k",
        "write -P 0x33 11M 64k",
    )
    ext = check_against_qemu(img, "vhdx", "vhdx:dynamic", sparse_gap=(2 * MiB, 4 * MiB))
    assert sum(n for _o, n in ext) <= 4 * MiB


@pytest.mark.parametrize("lss", [512, 4096])
def test_vhdx_builder_agrees_with_qemu(tmp_path: Path, lss: int) -> None:
    """The builder's dynamic VHDX (with ZERO/UNDEFINED/UNMAPPED blocks) reads as expected.

    With 512-byte logical sectors qemu is the reference.  qemu 7.2 refuses
    4 KiB logical sectors (ENOTSUP), so that variant is compared with the
    expectation computed from the writes.
    """
    img = tmp_path / "built.vhdx"
    writes = sector_writes(7, 6 * MiB, lss)
    build_vhdx(img, 6 * MiB, writes, lss=lss, states={2: 2, 3: 1, 4: 3})
    gap = (2 * MiB, 3 * MiB)
    if lss == 512:
        check_against_qemu(img, "vhdx", "vhdx:dynamic", sparse_gap=gap)
    else:
        with open_detected(img) as src:
            check_source(src, overlay(bytes(6 * MiB), writes), sparse_gap=gap)


# -- VHDX: differencing (spec-built; qemu 7.2 refuses to open these) -----------------


@pytest.fixture(scope="module")
def vhdx_parent(work: Path) -> tuple[Path, bytes]:
    parent = work / "parent.vhdx"
    run("qemu-img", "convert", "-O", "vhdx", "-o", "block_size=1M", work / "pattern.raw", parent)
    return parent, qemu_raw(parent, "vhdx")


@pytest.fixture()
def parent_vhdx(tmp_path: Path, vhdx_parent: tuple[Path, bytes]) -> Path:
    """A copy of :func:`vhdx_parent` in the test's own directory, to name or to damage."""
    parent = tmp_path / "parent.vhdx"
    parent.write_bytes(vhdx_parent[0].read_bytes())
    return parent


def linkage_of(parent: Path) -> str:
    """The ``parent_linkage`` a child of ``parent`` must carry: its data write GUID in braces."""
    return "{" + str(read_data_write_guid(parent)) + "}"


def vhdx_child(
    path: Path,
    relative_path: str,
    linkage: str | None = None,
    writes: list[tuple[int, bytes]] | None = None,
) -> None:
    """A differencing VHDX naming ``relative_path``; by default a random linkage no parent has."""
    build_vhdx(
        path,
        SIZE,
        writes or [],
        parent={
            "parent_linkage": linkage or "{" + str(uuid.uuid4()) + "}",
            "relative_path": relative_path,
        },
    )


@pytest.mark.parametrize("lss", [512, 4096])
def test_vhdx_differencing(tmp_path: Path, vhdx_parent, parent_vhdx: Path, lss: int) -> None:
    """Expectation, not qemu (qemu 7.2 returns ENOTSUP for differencing VHDX).

    Parent bytes from qemu, overlaid with the child's sectors; block 3 is
    PAYLOAD_BLOCK_ZERO in the child and hides the parent's data; 0xEE junk in
    unmarked sectors of partially present blocks must never show.  The 4 KiB
    sector child is larger than its parent: the excess reads as zeros.
    """
    parent = parent_vhdx
    linkage = linkage_of(parent)
    child = tmp_path / "child.vhdx"
    size = SIZE if lss == 512 else 5 * MiB + 4096  # 4 KiB sectors: larger than parent
    writes = sector_writes(8, size, lss)
    loc = {
        "parent_linkage": linkage,
        "relative_path": ".\\parent.vhdx",
        "absolute_win32_path": "C:\\VMs\\parent.vhdx",
    }
    build_vhdx(child, size, writes, lss=lss, parent=loc, states={3: 2}, junk=True)
    expect = bytearray(overlay(vhdx_parent[1], writes, size))
    expect[3 * MiB : 4 * MiB] = bytes(MiB)
    with open_detected(child) as src:
        assert src.format_name == "vhdx:differencing"
        assert src.chain() == [str(child), str(parent)]
        check_source(src, bytes(expect), sparse_gap=(3 * MiB, MiB))


def test_vhdx_two_level_chain_and_linkage2(tmp_path: Path, vhdx_parent, parent_vhdx: Path) -> None:
    parent = parent_vhdx
    mid = tmp_path / "mid.vhdx"
    w1 = sector_writes(9, SIZE)
    # parent_linkage is stale; parent_linkage2 names the parent's current GUID.
    mid_guid = build_vhdx(
        mid,
        SIZE,
        w1,
        junk=True,
        parent={
            "parent_linkage": "{" + str(uuid.uuid4()) + "}",
            "parent_linkage2": linkage_of(parent),
            "absolute_win32_path": "E:\\somewhere\\parent.vhdx",
        },
    )
    top = tmp_path / "top.vhdx"
    w2 = [(4 * MiB, b"\x99" * 8192)]
    build_vhdx(
        top,
        SIZE,
        w2,
        parent={"parent_linkage": "{" + str(mid_guid) + "}", "relative_path": "mid.vhdx"},
    )
    with open_detected(top) as src:
        assert src.chain() == [str(top), str(mid), str(parent)]
        check_source(src, overlay(overlay(vhdx_parent[1], w1), w2), sparse_gap=GAP)


def test_vhdx_linkage_mismatch_missing_and_loop(tmp_path: Path, parent_vhdx: Path) -> None:
    parent = parent_vhdx
    child = tmp_path / "child.vhdx"
    vhdx_child(child, ".\\parent.vhdx")
    with pytest.raises(SourceError, match="data write GUID") as info:
        open_detected(child)
    assert str(child) in str(info.value) and str(parent) in str(info.value)
    vhdx_child(child, "gone.vhdx")
    fails(child, "parent VHDX not found .*gone.vhdx")
    vhdx_child(child, "child.vhdx")
    fails(child, "chain loops")
    build_vhdx(child, SIZE, [], parent={"relative_path": "parent.vhdx"})
    fails(child, "no parent_linkage")


# -- VHDX: bad input ------------------------------------------------------------------


def reseal_vhdx(path: Path) -> None:
    """Recompute both headers' and region tables' CRC32C after a deliberate edit."""
    data = bytearray(path.read_bytes())
    reseal_vhdx_bytes(data)
    path.write_bytes(bytes(data))


def reseal_vhdx_bytes(data: bytearray) -> None:
    """:func:`reseal_vhdx` on an image in memory."""
    for off, size in (
        (64 * KiB, 4 * KiB),
        (128 * KiB, 4 * KiB),
        (192 * KiB, 64 * KiB),
        (256 * KiB, 64 * KiB),
    ):
        struct.pack_into("<I", data, off + 4, 0)
        struct.pack_into("<I", data, off + 4, crc32c(bytes(data[off : off + size])))


@pytest.fixture()
def vx(tmp_path: Path) -> Path:
    img = tmp_path / "victim.vhdx"
    build_vhdx(img, 6 * MiB, sector_writes(10, 6 * MiB))
    return img


META = 2 * MiB
BAT = 3 * MiB


def test_vhdx_one_bad_header_falls_back(vx: Path) -> None:
    before = read_all(open_detected(vx))
    patch(vx, 128 * KiB + 100, b"\xff")  # newer header (seq 2) now fails its CRC
    with open_detected(vx) as src:
        assert read_all(src) == before
    patch(vx, 64 * KiB + 100, b"\xff")
    fails(vx, "neither VHDX header is valid")


def test_vhdx_damaged_file_identifier_is_refused_not_raw(vx: Path) -> None:
    """Damage to the first bytes made a VHDX "raw": its container bytes were stored, no
    error.  Its valid headers give it away; --format raw still stores the bytes as asked."""
    patch(vx, 4, os.urandom(200))
    fails(vx, "VHDX image whose file identifier is damaged")
    with open_source(str(vx), "raw") as src:
        assert src.size == vx.stat().st_size


def test_vhdx_region_tables(vx: Path) -> None:
    patch(vx, 192 * KiB + 100, b"\xff")
    with open_detected(vx):
        pass  # second copy used
    patch(vx, 256 * KiB + 100, b"\xff")
    fails(vx, "neither VHDX region table is valid")


@pytest.mark.parametrize(
    ("offset", "value", "match"),
    [
        (0, b"vhdxfilX", "not a VHDX"),
        (64 * KiB + 66, struct.pack("<H", 2), "unsupported VHDX version"),
        (128 * KiB + 66, struct.pack("<H", 2), "unsupported VHDX version"),
        (192 * KiB + 8, struct.pack("<I", 5000), "region table has 5000 entries"),
        (
            192 * KiB + 16,
            uuid.uuid4().bytes_le + struct.pack("<QII", 3 * MiB, MiB, 0),
            "lacks the BAT",
        ),
        (192 * KiB + 32, struct.pack("<Q", 1 << 40), "past the end"),
        (192 * KiB + 32, struct.pack("<Q", 3 * MiB + 4096), "misaligned"),
        (192 * KiB + 40, struct.pack("<I", 8), "cannot hold"),
        (META, b"metadatX", "bad signature"),
        (META + 10, struct.pack("<H", 3000), "3000 entries"),
        (META + 48, struct.pack("<I", 100), "outside the metadata region"),
        (META + 64 * KiB, struct.pack("<I", 512 * KiB), "absurd block size"),
        (META + 64 * KiB, struct.pack("<I", 3 * MiB), "absurd block size"),
        (META + 64 * KiB + 32, struct.pack("<I", 1000), "logical sector size 1000"),
        (META + 64 * KiB + 8, struct.pack("<Q", 1 << 50), "virtual disk size"),
        (META + 64 * KiB + 8, struct.pack("<Q", 6 * MiB + 100), "virtual disk size"),
        (META + 64 * KiB + 4, struct.pack("<I", 2), "no parent locator"),
        (BAT, struct.pack("<Q", (1 << 40) << 20 | 6), "outside the file"),
        (BAT, struct.pack("<Q", 4), "reserved state 4"),
        (BAT, struct.pack("<Q", 4 << 20 | 7), "partially present in a non-differencing"),
    ],
)
def test_vhdx_bad_fields(vx: Path, offset: int, value: bytes, match: str) -> None:
    patch(vx, offset, value)
    if offset < 320 * KiB:
        reseal_vhdx(vx)
    fails(vx, match, "vhdx")


def test_vhdx_unknown_required_items(vx: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy.vhdx"
    copy.write_bytes(vx.read_bytes())
    # region entry 1 (metadata) keeps its place; add a required unknown entry 2.
    patch(vx, 192 * KiB + 8, struct.pack("<I", 3))
    patch(vx, 192 * KiB + 80, uuid.uuid4().bytes_le + struct.pack("<QII", MiB, MiB, 1))
    reseal_vhdx(vx)
    fails(vx, "requires unknown region")
    # metadata entry 0 (file parameters) renamed: unknown + required
    patch(copy, META + 32, uuid.uuid4().bytes_le)
    fails(copy, "requires unknown metadata item")


def test_vhdx_duplicate_metadata_and_overlapping_blocks(vx: Path, tmp_path: Path) -> None:
    data = vx.read_bytes()
    patch(vx, META + 64, data[META + 32 : META + 64])  # entry 1 := copy of entry 0
    fails(vx, "appears twice")
    # A 32 MiB disk with one block in a ~5 MiB file: 20 BAT entries naming that
    # block describe more data than the file can hold.
    big = tmp_path / "big.vhdx"
    build_vhdx(big, 32 * MiB, [(0, b"\x01" * 512)])
    first = big.read_bytes()[BAT : BAT + 8]
    patch(big, BAT, first * 20)
    fails(big, "blocks overlap")


def test_vhdx_log(tmp_path: Path) -> None:
    """A log with a valid entry for the header's log GUID is refused; a stale GUID is not."""
    log_guid = uuid.uuid4().bytes_le
    img = tmp_path / "log.vhdx"
    writes = sector_writes(11, 6 * MiB)
    build_vhdx(img, 6 * MiB, writes, log_guid=log_guid)
    with open_detected(img) as src:  # empty log: nothing to replay
        assert read_all(src) == overlay(bytes(6 * MiB), writes)
    entry = bytearray(4 * KiB)
    entry[0:4] = b"loge"
    struct.pack_into("<IIIQII", entry, 4, 0, 4 * KiB, 0, 1, 0, 0)
    entry[32:48] = log_guid
    struct.pack_into("<I", entry, 4, crc32c(bytes(entry)))
    stale = bytearray(entry)
    stale[100] = 1  # same GUID, bad CRC: not a valid entry, nothing to replay
    patch(img, MiB + 8 * KiB, bytes(stale))
    with open_detected(img):
        pass
    patch(img, MiB + 8 * KiB, bytes(entry))
    fails(img, "log that needs replaying")


def test_vhdx_missing_sector_bitmap(tmp_path: Path, parent_vhdx: Path) -> None:
    child = tmp_path / "child.vhdx"
    vhdx_child(child, "parent.vhdx", linkage_of(parent_vhdx), [(0, b"\x01" * 512)])
    chunk_ratio = (1 << 23) * 512 // MiB
    patch(child, BAT + 8 * chunk_ratio, bytes(8))
    fails(child, "sector bitmap block is missing")


def test_vhdx_truncated(vx: Path, tmp_path: Path) -> None:
    os.truncate(vx, vx.stat().st_size - 512 * KiB)
    fails(vx, "outside the file|truncated")
    tiny = tmp_path / "tiny.vhdx"
    tiny.write_bytes(b"vhdxfile" + bytes(1000))
    fails(tiny, "too small")


@pytest.fixture(scope="module")
def vhdx_fuzz_seed(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    d = tmp_path_factory.mktemp("vhdxfuzz")
    img = d / "s.vhdx"
    build_vhdx(img, 3 * MiB, sector_writes(12, 3 * MiB))
    return img.read_bytes()


REGIONS = [(0, 320 * KiB), (META, 64 * KiB + 64), (BAT, 64)]


@FUZZ
@given(
    edits=st.lists(
        st.tuples(st.integers(0, 2), st.integers(0, 2**20), st.binary(min_size=1, max_size=8)),
        max_size=6,
    ),
    reseal=st.booleans(),
    cut=st.none() | st.integers(0, 5 * MiB),
)
def test_vhdx_mutations_only_raise_source_error(
    vhdx_fuzz_seed: bytes, edits, reseal: bool, cut: int | None
) -> None:
    data = bytearray(vhdx_fuzz_seed)
    for region, pos, blob in edits:
        start, length = REGIONS[region]
        at = start + pos % length
        data[at : at + len(blob)] = blob
    if reseal:
        reseal_vhdx_bytes(data)
    if cut is not None:
        del data[cut:]
    exercise(bytes(data), "vhdx")


@FUZZ
@given(
    magic=st.sampled_from([b"conectix", b"vhdxfile"]),
    body=st.binary(max_size=4096),
    tail_footer=st.booleans(),
    pad=st.integers(0, 2 * MiB),
)
def test_arbitrary_bytes_only_raise_source_error(
    magic: bytes, body: bytes, tail_footer: bool, pad: int
) -> None:
    data = magic + body + bytes(pad)
    if tail_footer:  # make the end look like a fixed-VHD footer too
        data += b"conectix" + body[:504].ljust(504, b"\0")
    exercise(data, None)
