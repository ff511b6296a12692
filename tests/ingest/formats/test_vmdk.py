"""VMDK reader tests, with qemu-img 7.2 as the independent reference.

Every image is read whole through the reader (1 MiB pieces and odd unaligned
ranges) and compared byte for byte with ``qemu-img convert -O raw`` of the
same file.  Formats qemu cannot create (COWD, SEsparse, VMware's stream
layout) are written by :mod:`vmdk_builders` from the published layouts and
still checked against qemu's reader.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import struct
import subprocess
import tracemalloc
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ingest.formats.detect import FORMATS, detect_format, open_source
from ingest.formats.source import DiskSource
from ingest.formats.vmdk import VmdkSource, looks_like_vmdk
from ingest.formats.vmdk_cowd import parse_cowd_header
from ingest.formats.vmdk_descriptor import parse_descriptor
from ingest.formats.vmdk_extent import DATA
from ingest.formats.vmdk_sesparse import parse_sesparse_header
from ingest.formats.vmdk_sparse import parse_sparse_header
from repofs.errors import SourceError
from tests.support.imgfmt import open_detected
from tests.support.vmdk_builders import (
    SESPARSE_UNMAPPED,
    SESPARSE_ZERO,
    descriptor,
    sparse_header,
    write_cowd,
    write_mkimg_sparse,
    write_sesparse,
    write_stream_optimized,
)

pytestmark = pytest.mark.skipif(
    shutil.which("qemu-img") is None or shutil.which("qemu-io") is None,
    reason="qemu-img/qemu-io (apt package qemu-utils) are the reference reader",
)

MiB = 1 << 20
KiB = 1 << 10
SAMPLE_SIZE = 5 * MiB + 3 * 512  # neither a multiple of the grain nor of 64 KiB
HOLE = (2 * MiB, 4 * MiB)  # never written in the sample


# -- helpers ---------------------------------------------------------------------------------


def run(*args: str | Path) -> None:
    subprocess.run([str(a) for a in args], check=True, capture_output=True)


def qemu_raw(path: Path) -> bytes:
    out = path.parent / f".{path.name}.ref.raw"
    run("qemu-img", "convert", "-f", "vmdk", "-O", "raw", path, out)
    try:
        return out.read_bytes()
    finally:
        out.unlink()


def qemu_size(path: Path) -> int:
    info = subprocess.run(
        ["qemu-img", "info", "--output=json", str(path)], check=True, capture_output=True
    )
    return json.loads(info.stdout)["virtual-size"]


def qemu_io(path: Path, *commands: str) -> None:
    args: list[str | Path] = ["qemu-io", "-f", "vmdk"]
    for c in commands:
        args += ["-c", c]
    run(*args, path)


def read_whole(src: DiskSource, piece: int = MiB) -> bytes:
    return b"".join(src.read(o, min(piece, src.size - o)) for o in range(0, src.size, piece))


def odd_ranges(size: int) -> list[tuple[int, int]]:
    ranges = [(0, 1), (511, 2), (65535, 3), (65536 - 7, 70000), (MiB - 1, MiB + 2),
              (1000003, 777777), (size - 1, 1), (size - 4097, 4097), (size // 3, size // 3)]
    return [(o, n) for o, n in ranges if o >= 0 and o + n <= size]


def assert_matches(src: DiskSource, ref: bytes) -> None:
    """Whole-disk and unaligned reads equal the reference; allocation covers every byte."""
    assert src.size == len(ref)
    assert read_whole(src) == ref
    for o, n in odd_ranges(src.size):
        assert src.read(o, n) == ref[o : o + n], (o, n)
    rest = bytearray(ref)
    last_end = 0
    for o, n in src.allocated_extents():
        assert o >= last_end and n > 0 and o + n <= src.size
        last_end = o + n
        rest[o : o + n] = bytes(n)
    assert not any(rest), "allocated_extents() misses non-zero bytes"


def assert_not_allocated(src: DiskSource, start: int, end: int) -> None:
    for o, n in src.allocated_extents():
        assert o + n <= start or o >= end, f"({o}, {n}) overlaps unwritten [{start}, {end})"


def check(path: Path, fmt: str | None = None) -> VmdkSource:
    """Open ``path`` by content detection and compare it with qemu in every way."""
    ref = qemu_raw(path)
    src = open_detected(path)
    assert isinstance(src, VmdkSource)
    if fmt:
        assert src.format_name == f"vmdk:{fmt}"
    assert src.size == qemu_size(path)
    assert_matches(src, ref)
    return src


def expect_error(path: Path, culprit: Path | None = None, fmt: str | None = None) -> str:
    """Opening and fully reading ``path`` raises a one-line SourceError naming ``culprit``."""
    with pytest.raises(SourceError) as info, open_detected(path, fmt) as src:
        list(src.allocated_extents())
        read_whole(src, 4 * MiB)
    message = str(info.value)
    assert "\n" not in message
    assert str(culprit or path) in message, message
    return message


def patch(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def sparse_layout(path: Path) -> tuple[int, int, int]:
    """``(gd_offset, rgd_offset, grain)`` of a hosted sparse file, bytes."""
    head = path.read_bytes()[:512]
    grain, = struct.unpack_from("<Q", head, 20)
    rgd, gd = struct.unpack_from("<QQ", head, 48)
    return gd * 512, rgd * 512, grain * 512


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Random, repeated, tiny and zero regions, and a partial last grain."""
    rnd = random.Random(20240501)
    data = bytearray(SAMPLE_SIZE)
    data[0 : 64 * KiB] = rnd.randbytes(64 * KiB)
    data[64 * KiB : 128 * KiB] = b"repeated" * (8 * KiB)
    data[MiB + 100 : MiB + 300] = b"x" * 200
    data[MiB + MiB // 2 : MiB + MiB // 2 + 4096] = b"\xff" * 4096
    data[4 * MiB : 5 * MiB] = rnd.randbytes(MiB)
    data[-1000:] = rnd.randbytes(1000)
    path = tmp_path_factory.mktemp("sample") / "sample.raw"
    path.write_bytes(data)
    return path


def convert(sample: Path, dest: Path, subformat: str, *options: str) -> Path:
    opts = ",".join((f"subformat={subformat}", *options))
    run("qemu-img", "convert", "-f", "raw", "-O", "vmdk", "-o", opts, sample, dest)
    return dest


# -- subformats qemu-img writes ---------------------------------------------------------------


class TestSubformats:
    @pytest.mark.parametrize(
        ("subformat", "options"),
        [
            ("monolithicSparse", ()),
            ("monolithicSparse", ("adapter_type=lsilogic", "compat6=on")),
            ("monolithicFlat", ("adapter_type=buslogic",)),
            ("twoGbMaxExtentSparse", ("adapter_type=legacyESX",)),
            ("twoGbMaxExtentFlat", ("adapter_type=lsilogic",)),
            ("streamOptimized", ()),
            ("streamOptimized", ("adapter_type=buslogic", "hwversion=6")),
        ],
    )
    def test_converted_image_matches_qemu(
        self, sample: Path, tmp_path: Path, subformat: str, options: tuple[str, ...]
    ) -> None:
        """Every subformat reads back exactly what qemu reads, and skips the unwritten hole."""
        path = convert(sample, tmp_path / "disk.vmdk", subformat, *options)
        with check(path, subformat) as src:
            assert_not_allocated(src, *HOLE)
            assert src.chain()[0] == str(path)
            assert all(os.path.exists(f) for f in src.chain())

    def test_sample_equals_source(self, sample: Path, tmp_path: Path) -> None:
        """The reference itself is sane: qemu round-trips the sample."""
        path = convert(sample, tmp_path / "disk.vmdk", "monolithicSparse")
        assert qemu_raw(path) == sample.read_bytes()

    def test_written_with_qemu_io(self, tmp_path: Path) -> None:
        """An image grown by scattered small writes (unaligned size) matches qemu."""
        path = tmp_path / "w.vmdk"
        run("qemu-img", "create", "-q", "-f", "vmdk", path, str(3 * MiB + 512))
        qemu_io(path, "write -P 0x11 0 512", "write -P 0x22 70000 5000",
                "write -P 0x33 2M 64k", f"write -P 0x44 {3 * MiB - 512} 1024")
        with check(path, "monolithicSparse") as src:
            assert_not_allocated(src, 128 * KiB, 2 * MiB)

    @pytest.mark.parametrize("subformat", ["twoGbMaxExtentSparse", "twoGbMaxExtentFlat"])
    def test_split_across_2gb_extents(self, tmp_path: Path, subformat: str) -> None:
        """Writes spanning the 2 GiB extent boundaries of a 4 GiB disk read back correctly."""
        path = tmp_path / "split.vmdk"
        size = 4 * 1024 * MiB + 1536
        run("qemu-img", "create", "-q", "-f", "vmdk", "-o", f"subformat={subformat}", path,
            str(size))
        qemu_io(path, "write -P 0x61 2047M 2M", "write -P 0x62 4095M 1M",
                f"write -P 0x63 {size - 1536} 1536")
        ref_path = tmp_path / "ref.raw"
        run("qemu-img", "convert", "-O", "raw", path, ref_path)
        with open_detected(path) as src, open(ref_path, "rb") as ref:
            assert src.size == size == qemu_size(path)
            assert src.format_name == f"vmdk:{subformat}"
            assert len(src.chain()) == 4
            extents = list(src.allocated_extents())
            assert sum(n for _, n in extents) < 8 * MiB
            for o, n in [*extents, (2 * 1024 * MiB - 4096, 8192), (0, MiB)]:
                ref.seek(o)
                assert src.read(o, n) == ref.read(n), (o, n)
            # Everything qemu reports as data lies inside allocated_extents().
            fd = ref.fileno()
            pos = 0
            while True:
                try:
                    pos = os.lseek(fd, pos, os.SEEK_DATA)
                except OSError:
                    break
                hole = os.lseek(fd, pos, os.SEEK_HOLE)
                ref.seek(pos)
                chunk = ref.read(hole - pos)
                for o, n in extents:
                    lo, hi = max(o, pos), min(o + n, hole)
                    if lo < hi:
                        chunk = chunk[: lo - pos] + bytes(hi - lo) + chunk[hi - pos :]
                assert not any(chunk)
                pos = hole

    def test_permuted_grains(self, tmp_path: Path) -> None:
        """Grains stored in reverse write order (read by gathering spans) match qemu."""
        path = tmp_path / "perm.vmdk"
        run("qemu-img", "create", "-q", "-f", "vmdk", path, "3M")
        writes = [f"write -P 0x{i + 1:x} {i * 64}k 64k" for i in reversed(range(40))]
        qemu_io(path, *writes, "write -P 0xee 2M 1k")
        with check(path) as src:
            assert len(src.plan(0, 40 * 64 * KiB)) == 40

    def test_reads_coalesce_into_one_pread(self, tmp_path: Path) -> None:
        """A 4 MiB read of contiguous grains is planned as a single file read."""
        raw = tmp_path / "r.raw"
        raw.write_bytes(random.Random(1).randbytes(8 * MiB))
        path = convert(raw, tmp_path / "r.vmdk", "monolithicSparse")
        with open_detected(path) as src:
            assert isinstance(src, VmdkSource)
            for offset in (0, 4 * MiB):
                plan = src.plan(offset, 4 * MiB)
                assert [p[2] for p in plan] == [DATA]
            assert src.read(0, 8 * MiB) == raw.read_bytes()


# -- hand-written descriptors -----------------------------------------------------------------


class TestDescriptors:
    def test_vmfs_descriptor(self, tmp_path: Path) -> None:
        """An ESXi ``vmfs`` descriptor with a -flat.vmdk reads like qemu reads it."""
        flat = tmp_path / "vm-flat.vmdk"
        flat.write_bytes(random.Random(2).randbytes(3 * MiB + 512))
        desc = tmp_path / "vm.vmdk"
        sectors = flat.stat().st_size // 512
        desc.write_text(descriptor("vmfs", [f'RW {sectors} VMFS "vm-flat.vmdk"']))
        with check(desc, "vmfs") as src:
            assert src.chain() == [str(desc), str(flat)]

    def test_vmfs_thin_descriptor(self, tmp_path: Path) -> None:
        """``vmfsThin`` (which qemu refuses) reads as its flat file; holes are unallocated."""
        flat = tmp_path / "thin-flat.vmdk"
        with open(flat, "wb") as f:
            f.truncate(8 * MiB)
            f.write(b"boot" * 128)
            f.seek(6 * MiB)
            f.write(random.Random(3).randbytes(MiB))
        desc = tmp_path / "thin.vmdk"
        desc.write_text(
            descriptor("vmfsThin", ['RW 16384 VMFS "thin-flat.vmdk"'],
                       extra='ddb.thinProvisioned = "1"\n')
        )
        with open_detected(desc) as src:
            assert src.format_name == "vmdk:vmfsThin"
            assert_matches(src, flat.read_bytes())
            assert_not_allocated(src, MiB, 6 * MiB)

    def test_flat_extents_with_offsets_zero_extent_and_subdirectory(self, tmp_path: Path) -> None:
        """Several FLAT extents (relative paths, file offsets) and a ZERO extent concatenate."""
        (tmp_path / "data").mkdir()
        a = random.Random(4).randbytes(MiB)
        b = random.Random(5).randbytes(2 * MiB)
        (tmp_path / "data" / "a.bin").write_bytes(a)
        (tmp_path / "data" / "b.bin").write_bytes(b)
        lines = ['RW 2048 FLAT "data/a.bin" 0', 'RW 1024 FLAT "data/b.bin" 2048',
                 "RW 2048 ZERO", 'RW 1024 FLAT "data/b.bin" 0']
        desc = tmp_path / "multi.vmdk"
        desc.write_text(descriptor("twoGbMaxExtentFlat", lines))
        expected = a + b[MiB : MiB + 512 * KiB] + bytes(MiB) + b[: 512 * KiB]
        with open_detected(desc) as src:
            assert src.format_name == "vmdk:twoGbMaxExtentFlat"
            assert_matches(src, expected)
            assert_not_allocated(src, MiB + 512 * KiB, 2 * MiB + 512 * KiB)
            assert src.chain() == [str(desc), str(tmp_path / "data" / "a.bin"),
                                   str(tmp_path / "data" / "b.bin")]
        # Without the ZERO extent (qemu skips those) qemu agrees.
        desc.write_text(descriptor("twoGbMaxExtentFlat", [lines[0], lines[1], lines[3]]))
        check(desc)

    def test_non_utf8_extent_name(self, tmp_path: Path) -> None:
        """A Latin-1 extent name opens the right file; errors about it stay printable."""
        raw_name = b"disque-\xe9t\xe9-flat.vmdk"
        with open(os.path.join(os.fsencode(tmp_path), raw_name), "wb") as f:
            f.write(b"\x07" * 4096)
        desc = tmp_path / "latin.vmdk"
        text = descriptor("monolithicFlat", ['RW 8 FLAT "@" 0']).encode()
        desc.write_bytes(text.replace(b"@", raw_name))
        with open_detected(desc) as src:
            assert src.read(0, 4096) == b"\x07" * 4096
        desc.write_bytes(text.replace(b"@", raw_name + b"x"))
        message = expect_error(desc)
        message.encode("utf-8")  # no lone surrogates: printing it cannot fail
        assert "missing" in message

    def test_descriptor_with_crlf_and_comments(self, tmp_path: Path) -> None:
        """Windows line endings, blank lines and unknown keys are tolerated."""
        (tmp_path / "w-flat.vmdk").write_bytes(b"\x42" * 4096)
        text = descriptor("monolithicFlat", ['RW 8 FLAT "w-flat.vmdk" 0'],
                          extra='ddb.uuid = "60 00 C2 9a"\nfoo.bar = "x"\n')
        desc = tmp_path / "w.vmdk"
        desc.write_bytes(text.replace("\n", "\r\n").encode())
        with open_detected(desc) as src:
            assert src.read(0, 4096) == b"\x42" * 4096


# -- snapshot chains --------------------------------------------------------------------------


def make_chain(tmp_path: Path, sample: Path, depth: int, subformat: str = "monolithicSparse"
               ) -> list[Path]:
    base = convert(sample, tmp_path / "base.vmdk", "monolithicSparse")
    paths = [base]
    for i in range(1, depth):
        child = tmp_path / f"snap{i}.vmdk"
        run("qemu-img", "create", "-q", "-f", "vmdk", "-o", f"subformat={subformat}",
            "-b", paths[-1].name, "-F", "vmdk", child)
        qemu_io(child, f"write -P 0x{0x59 + i:x} {i}M 64k",
                f"write -P 0x{0x70 + i:x} {i * 700}k 3k")
        paths.append(child)
    return paths


class TestChains:
    def test_child_reads_through_parent(self, sample: Path, tmp_path: Path) -> None:
        """Unallocated grains of a child come from its parent."""
        base, child = make_chain(tmp_path, sample, 2)
        with check(child, "monolithicSparse") as src:
            assert src.chain() == [str(child), str(base)]
            assert src.read(MiB, 64 * KiB) == b"\x5a" * 64 * KiB
            assert_not_allocated(src, *HOLE)

    @pytest.mark.parametrize("subformat", ["monolithicSparse", "twoGbMaxExtentSparse"])
    def test_three_deep_chain(self, sample: Path, tmp_path: Path, subformat: str) -> None:
        """A grandchild sees its own writes, then its parent's, then the base's."""
        paths = make_chain(tmp_path, sample, 3, subformat)
        with check(paths[-1], subformat) as src:
            names = [os.path.basename(p) for p in src.chain()]
            assert names[0] == "snap2.vmdk" and names[-1] == "base.vmdk"
            assert "snap1.vmdk" in names

    def test_zeroed_grain_masks_parent(self, sample: Path, tmp_path: Path) -> None:
        """A zeroed-grain entry (GTE 1) reads as zeros and is not allocated, not the parent."""
        base = convert(sample, tmp_path / "base.vmdk", "monolithicSparse")
        child = tmp_path / "child.vmdk"
        run("qemu-img", "create", "-q", "-f", "vmdk", "-o", "zeroed_grain=on",
            "-b", "base.vmdk", "-F", "vmdk", child)
        qemu_io(child, "write -z 0 128k", "write -z 4M 1M", "write -P 0x5a 1M 64k")
        with check(child) as src:
            assert src.read(0, 128 * KiB) == bytes(128 * KiB)
            assert_not_allocated(src, 0, 128 * KiB)
            assert_not_allocated(src, 4 * MiB, 5 * MiB)
        assert base.exists()

    def test_parent_smaller_than_child(self, tmp_path: Path) -> None:
        """Beyond the end of a smaller parent the child reads zeros, like qemu."""
        base = tmp_path / "small.vmdk"
        run("qemu-img", "create", "-q", "-f", "vmdk", base, "1M")
        qemu_io(base, "write -P 0x21 0 1M")
        child = tmp_path / "big.vmdk"
        run("qemu-img", "create", "-q", "-f", "vmdk", "-b", "small.vmdk", "-F", "vmdk", child, "3M")
        qemu_io(child, "write -P 0x22 2M 4k")
        check(child)

    def test_absolute_parent_hint_falls_back_to_sibling(self, sample: Path, tmp_path: Path
                                                        ) -> None:
        """An ESXi-style absolute hint that does not exist here resolves next to the child."""
        base = tmp_path / "esx-flat.vmdk"
        base.write_bytes(sample.read_bytes()[: 4 * MiB])
        (tmp_path / "esx.vmdk").write_text(
            descriptor("vmfs", ['RW 8192 VMFS "esx-flat.vmdk"'], cid=0xAAAA0001))
        write_cowd(str(tmp_path / "esx-000001-delta.vmdk"), 8192, 1, {3: b"\x01" * 512})
        child = tmp_path / "esx-000001.vmdk"
        child.write_text(descriptor(
            "vmfsSparse", ['RW 8192 VMFSSPARSE "esx-000001-delta.vmdk"'], cid=0xAAAA0002,
            parent_cid=0xAAAA0001, parent_hint="/vmfs/volumes/datastore1/vm/esx.vmdk"))
        with open_detected(child) as src:
            assert src.chain()[2] == str(tmp_path / "esx.vmdk")
            expected = bytearray(base.read_bytes())
            expected[3 * 512 : 4 * 512] = b"\x01" * 512
            assert_matches(src, bytes(expected))

    def test_cid_mismatch(self, sample: Path, tmp_path: Path) -> None:
        """A parent written to after the snapshot was taken is refused, naming both files."""
        base, child = make_chain(tmp_path, sample, 2)
        qemu_io(base, "write -P 0x01 0 4k")  # qemu gives the parent a new CID
        message = expect_error(child)
        assert str(base) in message and "parentCID" in message

    def test_missing_parent(self, sample: Path, tmp_path: Path) -> None:
        """A parent that is not there is an error naming the child and the hint."""
        base, child = make_chain(tmp_path, sample, 2)
        base.rename(tmp_path / "elsewhere.vmdk")
        assert "base.vmdk" in expect_error(child)

    def test_chain_loop(self, tmp_path: Path) -> None:
        """Descriptors naming each other as parents are a loop, not a hang."""
        (tmp_path / "d-flat.vmdk").write_bytes(bytes(4096))
        extent = ['RW 8 FLAT "d-flat.vmdk" 0']
        (tmp_path / "a.vmdk").write_text(descriptor(
            "monolithicFlat", extent, cid=1, parent_cid=2, parent_hint="b.vmdk"))
        (tmp_path / "b.vmdk").write_text(descriptor(
            "monolithicFlat", extent, cid=2, parent_cid=1, parent_hint="a.vmdk"))
        assert "loops" in expect_error(tmp_path / "a.vmdk")
        (tmp_path / "self.vmdk").write_text(descriptor(
            "monolithicFlat", extent, cid=3, parent_cid=3, parent_hint="self.vmdk"))
        assert "loops" in expect_error(tmp_path / "self.vmdk")

    def test_missing_extent_file(self, sample: Path, tmp_path: Path) -> None:
        """A descriptor whose extent file is gone names the descriptor and the extent."""
        path = convert(sample, tmp_path / "disk.vmdk", "twoGbMaxExtentFlat")
        (tmp_path / "disk-f001.vmdk").unlink()
        assert "disk-f001.vmdk" in expect_error(path)


# -- ESXi snapshot deltas (built from the specs, read by qemu as the reference) ---------------


def esx_base(tmp_path: Path, sample: Path, sectors: int) -> Path:
    flat = tmp_path / "vm-flat.vmdk"
    data = sample.read_bytes()
    flat.write_bytes((data * (sectors * 512 // len(data) + 1))[: sectors * 512])
    desc = tmp_path / "vm.vmdk"
    desc.write_text(descriptor("vmfs", [f'RW {sectors} VMFS "vm-flat.vmdk"'], cid=0x0B0B0B0B))
    return desc


class TestEsxiDeltas:
    @pytest.mark.parametrize("grain", [1, 8])
    def test_vmfs_sparse_cowd_delta(self, sample: Path, tmp_path: Path, grain: int) -> None:
        """A vmfsSparse (COWD) delta over a vmfs base matches qemu."""
        sectors = 10243  # not a multiple of any grain or table
        esx_base(tmp_path, sample, sectors)
        grains = {0: b"\xc0" * 512 * grain, 7: b"\xc7" * 300, 4096 // grain + 1: b"\xc1" * 512,
                  (sectors - 1) // grain: b"\xcf" * 512 * grain}
        write_cowd(str(tmp_path / "vm-000001-delta.vmdk"), sectors, grain, grains)
        child = tmp_path / "vm-000001.vmdk"
        child.write_text(descriptor(
            "vmfsSparse", [f'RW {sectors} VMFSSPARSE "vm-000001-delta.vmdk"'], cid=0x0C0C0C0C,
            parent_cid=0x0B0B0B0B, parent_hint="vm.vmdk"))
        with check(child, "vmfsSparse") as src:
            assert [os.path.basename(f) for f in src.chain()] == [
                "vm-000001.vmdk", "vm-000001-delta.vmdk", "vm.vmdk", "vm-flat.vmdk"]

    def test_sesparse_delta(self, sample: Path, tmp_path: Path) -> None:
        """An seSparse delta (allocated, zero and unmapped grains) over vmfs matches qemu."""
        sectors = 40963
        esx_base(tmp_path, sample, sectors)
        grains: dict[int, bytes | int] = {
            0: b"\xe0" * 4096, 1: SESPARSE_ZERO, 2: SESPARSE_UNMAPPED, 3: b"\xe3" * 100,
            4096: b"\xe4" * 4096, 4097: SESPARSE_ZERO, (sectors - 1) // 8: b"\xef" * 4096,
        }
        write_sesparse(str(tmp_path / "vm-000001-sesparse.vmdk"), sectors, grains)
        child = tmp_path / "vm-000001.vmdk"
        child.write_text(descriptor(
            "seSparse", [f'RW {sectors} SESPARSE "vm-000001-sesparse.vmdk"'], cid=0x0D0D0D0D,
            parent_cid=0x0B0B0B0B, parent_hint="vm.vmdk"))
        with check(child, "seSparse") as src:
            assert src.read(4096, 8192) == bytes(8192)
            assert_not_allocated(src, 4096, 3 * 4096)
            assert_not_allocated(src, 4097 * 4096, 4098 * 4096)

    def test_mixed_three_deep_esx_chain(self, sample: Path, tmp_path: Path) -> None:
        """vmfs base, COWD delta, SEsparse delta on top: all three layers show through."""
        sectors = 8192
        esx_base(tmp_path, sample, sectors)
        write_cowd(str(tmp_path / "s1-delta.vmdk"), sectors, 1, {8: b"\x11" * 512})
        (tmp_path / "s1.vmdk").write_text(descriptor(
            "vmfsSparse", [f'RW {sectors} VMFSSPARSE "s1-delta.vmdk"'], cid=0x51,
            parent_cid=0x0B0B0B0B, parent_hint="vm.vmdk"))
        write_sesparse(str(tmp_path / "s2-sesparse.vmdk"), sectors,
                       {0: b"\x22" * 4096, 2: SESPARSE_ZERO})
        top = tmp_path / "s2.vmdk"
        top.write_text(descriptor(
            "seSparse", [f'RW {sectors} SESPARSE "s2-sesparse.vmdk"'], cid=0x52, parent_cid=0x51,
            parent_hint="s1.vmdk"))
        with check(top, "seSparse") as src:
            assert len(src.chain()) == 6
            assert src.read(8 * 512, 512) == b"\x11" * 512


class TestStreamOptimized:
    def test_vmware_stream_with_footer(self, sample: Path, tmp_path: Path) -> None:
        """A stream with its grain directory at the end (as VMware writes) matches qemu."""
        path = tmp_path / "ova-disk1.vmdk"
        write_stream_optimized(str(path), sample.read_bytes(), name=path.name)
        with check(path, "streamOptimized") as src:
            assert_not_allocated(src, *HOLE)

    def test_stream_without_markers(self, sample: Path, tmp_path: Path) -> None:
        """Compressed grains without markers (bare zlib streams) match qemu.

        The data must compress: qemu reads at most one grain of input when
        there is no marker to give the compressed size.
        """
        data = bytearray(sample.read_bytes())
        counter = b"".join(b"%08d" % i for i in range(MiB // 8))
        data[: 64 * KiB] = counter[: 64 * KiB]
        data[4 * MiB : 5 * MiB] = counter
        data[-1000:] = counter[:1000]
        path = tmp_path / "nomark.vmdk"
        write_stream_optimized(str(path), bytes(data), name=path.name, markers=False)
        check(path)

    def test_stream_small_grains(self, sample: Path, tmp_path: Path) -> None:
        """8-sector grains (many markers per read) decode and coalesce correctly."""
        path = tmp_path / "small.vmdk"
        write_stream_optimized(str(path), sample.read_bytes(), name=path.name, grain=8)
        check(path)


class TestMkimg:
    """FreeBSD's mkimg names the extent of its embedded descriptors ``""``: the file itself."""

    def test_monolithic_sparse_as_mkimg_writes_it(self, sample: Path, tmp_path: Path) -> None:
        """mkimg's monolithicSparse (version 1, redundant GD, extent ``""``) matches qemu."""
        raw = sample.read_bytes()
        raw = raw.ljust(-(-len(raw) // MiB) * MiB, b"\0")  # mkimg rounds to whole MiB
        path = tmp_path / "FreeBSD.vmdk"
        write_mkimg_sparse(str(path), raw)
        with check(path, "monolithicSparse") as src:
            assert src.chain() == [str(path)]
            assert_not_allocated(src, *HOLE)

    def test_stream_optimized_with_a_nameless_extent(self, sample: Path, tmp_path: Path) -> None:
        """mkimg's streamOptimized names its extent ``""`` too."""
        path = tmp_path / "FreeBSD-stream.vmdk"
        write_stream_optimized(str(path), sample.read_bytes(), name="")
        check(path, "streamOptimized")

    def test_only_an_embedded_descriptor_may_leave_the_name_empty(self) -> None:
        """A text descriptor's extent has to name a file; an embedded one's is the sparse file."""
        text = b'createType="monolithicSparse"\nRW 2048 SPARSE ""\n'
        assert parse_descriptor(text, "d", embedded=True).extents[0].filename == ""
        with pytest.raises(SourceError, match="needs a quoted file name"):
            parse_descriptor(text, "d")
        flat = b'createType="monolithicFlat"\nRW 2048 FLAT ""\n'
        with pytest.raises(SourceError, match="needs a quoted file name"):
            parse_descriptor(flat, "d", embedded=True)


# -- redundant grain directory ---------------------------------------------------------------


class TestRedundantTables:
    def test_damaged_primary_directory_falls_back(self, sample: Path, tmp_path: Path) -> None:
        """A primary GD entry pointing past EOF is replaced by the redundant one."""
        path = convert(sample, tmp_path / "disk.vmdk", "monolithicSparse")
        gd, rgd, _ = sparse_layout(path)
        assert rgd
        patch(path, gd, struct.pack("<I", 0x7FFFFFFF))
        with open_detected(path) as src:
            assert_matches(src, sample.read_bytes())

    def test_tables_disagree(self, sample: Path, tmp_path: Path) -> None:
        """Primary and redundant grain tables that differ are an error, not a guess."""
        path = convert(sample, tmp_path / "disk.vmdk", "monolithicSparse")
        gd, _, _ = sparse_layout(path)
        gt_sector, = struct.unpack_from("<I", path.read_bytes(), gd)
        patch(path, gt_sector * 512 + 4 * 40, struct.pack("<I", 0x80))
        assert "disagree" in expect_error(path)


# -- bad input --------------------------------------------------------------------------------


def _hdr(path: Path, offset: int, fmt: str, value: int) -> None:
    patch(path, offset, struct.pack(fmt, value))


SPARSE_DAMAGE = {
    "bad magic in a forced open": lambda p: patch(p, 0, b"XXXX"),
    "version 9": lambda p: _hdr(p, 4, "<I", 9),
    "capacity over 1 PiB": lambda p: _hdr(p, 12, "<Q", 1 << 42),
    "grain not a power of two": lambda p: _hdr(p, 20, "<Q", 96),
    "grain over 2 MiB": lambda p: _hdr(p, 20, "<Q", 8192),
    "513 entries per table": lambda p: _hdr(p, 44, "<I", 513),
    "128 entries per table": lambda p: _hdr(p, 44, "<I", 128),
    "descriptor size absurd": lambda p: _hdr(p, 36, "<Q", 1 << 40),
    "unknown compression": lambda p: _hdr(p, 77, "<H", 7),
    "newline check damaged": lambda p: patch(p, 73, b"\r\n\n "),
    "both directories past EOF": lambda p: (_hdr(p, 48, "<Q", 1 << 30), _hdr(p, 56, "<Q", 1 << 30)),
    "truncated to half": lambda p: os.truncate(p, p.stat().st_size // 2),
    "truncated in the header": lambda p: os.truncate(p, 300),
    "overhead past EOF": lambda p: _hdr(p, 64, "<Q", 1 << 40),
}


class TestBadInput:
    @pytest.mark.parametrize("damage", sorted(SPARSE_DAMAGE))
    def test_damaged_sparse_header(self, sample: Path, tmp_path: Path, damage: str) -> None:
        """Each kind of header damage is a SourceError naming the file."""
        path = convert(sample, tmp_path / "disk.vmdk", "monolithicSparse")
        SPARSE_DAMAGE[damage](path)
        expect_error(path, fmt="vmdk")

    @pytest.mark.parametrize("which", ["primary", "redundant"])
    def test_grain_table_entry_past_eof(self, sample: Path, tmp_path: Path, which: str) -> None:
        """A grain table entry pointing past the end of the file is refused."""
        path = convert(sample, tmp_path / "disk.vmdk", "monolithicSparse")
        gd, rgd, _ = sparse_layout(path)
        for base in (gd, rgd):  # same entry in both copies, so they agree
            gt, = struct.unpack_from("<I", path.read_bytes(), base)
            patch(path, gt * 512, struct.pack("<I", 0x7FFFFFF0))
        assert "past the end" in expect_error(path)

    def test_directory_entry_past_eof(self, sample: Path, tmp_path: Path) -> None:
        """GD entries past EOF in both directories are refused."""
        path = convert(sample, tmp_path / "disk.vmdk", "monolithicSparse")
        gd, rgd, _ = sparse_layout(path)
        patch(path, gd, struct.pack("<I", 0x7FFFFFF0))
        patch(path, rgd, struct.pack("<I", 0x7FFFFFF0))
        assert "past the end" in expect_error(path)

    def test_zeroed_grain_without_flag(self, sample: Path, tmp_path: Path) -> None:
        """GTE 1 in an image that did not enable zeroed grains is damage."""
        path = convert(sample, tmp_path / "disk.vmdk", "monolithicSparse")
        gd, rgd, _ = sparse_layout(path)
        for base in (gd, rgd):
            gt, = struct.unpack_from("<I", path.read_bytes(), base)
            patch(path, gt * 512, struct.pack("<I", 1))
        assert "zeroed" in expect_error(path)

    def test_stream_grain_inflates_short(self, sample: Path, tmp_path: Path) -> None:
        """A compressed grain that inflates to less than the grain size is refused."""
        path = tmp_path / "s.vmdk"
        write_stream_optimized(str(path), sample.read_bytes(), name=path.name,
                               tamper=lambda g, c: (g * 128, zlib.compress(c[: len(c) // 2])))
        assert "inflates to" in expect_error(path)

    def test_stream_grain_inflates_long(self, sample: Path, tmp_path: Path) -> None:
        """A compressed grain that inflates to more than the grain size is refused."""
        path = tmp_path / "s.vmdk"
        write_stream_optimized(str(path), sample.read_bytes(), name=path.name,
                               tamper=lambda g, c: (g * 128, zlib.compress(c + bytes(4096))))
        assert "more than the grain" in expect_error(path)

    def test_stream_grain_corrupt_deflate(self, sample: Path, tmp_path: Path) -> None:
        """Garbage in place of deflate data is refused."""
        path = tmp_path / "s.vmdk"
        write_stream_optimized(str(path), sample.read_bytes(), name=path.name,
                               tamper=lambda g, c: (g * 128, b"\x78\x9c" + b"\xff" * 40))
        assert "inflate" in expect_error(path)

    def test_stream_marker_lba_mismatch(self, sample: Path, tmp_path: Path) -> None:
        """A grain marker for another LBA means the table points at the wrong grain."""
        path = tmp_path / "s.vmdk"
        write_stream_optimized(str(path), sample.read_bytes(), name=path.name,
                               tamper=lambda g, c: (g * 128 + 128, zlib.compress(c)))
        assert "marker" in expect_error(path)

    def test_stream_missing_footer(self, sample: Path, tmp_path: Path) -> None:
        """A stream cut before its footer (interrupted download) is refused."""
        path = tmp_path / "s.vmdk"
        write_stream_optimized(str(path), sample.read_bytes(), name=path.name)
        os.truncate(path, path.stat().st_size - 512)
        assert "footer" in expect_error(path)

    def test_qemu_stream_truncated(self, sample: Path, tmp_path: Path) -> None:
        """A qemu-written stream cut in the middle of its grains is refused."""
        path = convert(sample, tmp_path / "disk.vmdk", "streamOptimized")
        os.truncate(path, path.stat().st_size // 2)
        expect_error(path)

    @pytest.mark.parametrize(
        ("offset", "value", "words"),
        [(16, 3, "power of two"), (20, 2, "overlaps"), (24, 0, "entries"), (4, 2, "version"),
         (12, 0, "zero")],
    )
    def test_bad_cowd_header(self, sample: Path, tmp_path: Path, offset: int, value: int,
                             words: str) -> None:
        """COWD header damage names the delta file."""
        esx_base(tmp_path, sample, 8192)
        delta = tmp_path / "d-delta.vmdk"
        write_cowd(str(delta), 8192, 1, {1: b"\x01" * 512})
        _hdr(delta, offset, "<I", value)
        child = tmp_path / "d.vmdk"
        child.write_text(descriptor("vmfsSparse", ['RW 8192 VMFSSPARSE "d-delta.vmdk"'],
                                    cid=5, parent_cid=0x0B0B0B0B, parent_hint="vm.vmdk"))
        assert words in expect_error(child, delta)

    def test_cowd_grain_past_eof(self, sample: Path, tmp_path: Path) -> None:
        """A COWD grain pointer past the end of the delta is refused."""
        esx_base(tmp_path, sample, 8192)
        delta = tmp_path / "d-delta.vmdk"
        write_cowd(str(delta), 8192, 1, {1: b"\x01" * 512})
        os.truncate(delta, delta.stat().st_size - 512)
        child = tmp_path / "d.vmdk"
        child.write_text(descriptor("vmfsSparse", ['RW 8192 VMFSSPARSE "d-delta.vmdk"'],
                                    cid=5, parent_cid=0x0B0B0B0B, parent_hint="vm.vmdk"))
        expect_error(child, delta)

    @pytest.mark.parametrize("case", ["journal", "gd entry", "version", "truncated"])
    def test_bad_sesparse(self, sample: Path, tmp_path: Path, case: str) -> None:
        """SEsparse damage (dirty journal, bad table reference, header, truncation) is refused."""
        esx_base(tmp_path, sample, 8192)
        delta = tmp_path / "d-sesparse.vmdk"
        write_sesparse(str(delta), 8192, {1: b"\x01" * 4096},
                       replay_journal=int(case == "journal"),
                       gd_override={0: 0x2000000000000000} if case == "gd entry" else None)
        if case == "version":
            _hdr(delta, 8, "<Q", 0x300000001)
        if case == "truncated":
            os.truncate(delta, delta.stat().st_size - 4096)
        child = tmp_path / "d.vmdk"
        child.write_text(descriptor("seSparse", ['RW 8192 SESPARSE "d-sesparse.vmdk"'],
                                    cid=5, parent_cid=0x0B0B0B0B, parent_hint="vm.vmdk"))
        expect_error(child, delta)

    @pytest.mark.parametrize(
        ("text", "words"),
        [
            ('createType="monolithicFlat"\nRW 8 FLAT\n', "extent"),
            ('createType="monolithicFlat"\nRW 8 FANCY "x"\n', "unknown extent type"),
            ('RW 8 FLAT "x" 0\n', "createType"),
            ('createType="vmfsPassthroughRawDeviceMap"\nRW 8 VMFSRDM "x"\n', "device"),
            ('createType="monolithicFlat"\nRW 8 VMFSRDM "x"\n', "raw device"),
            ('createType="somethingNew"\nRW 8 FLAT "x" 0\n', "unsupported createType"),
            ('createType="monolithicFlat"\n', "no extents"),
            ('createType="monolithicFlat"\nRW 0 FLAT "x" 0\n', "out of range"),
            ('createType="monolithicFlat"\nNOACCESS 8 FLAT "x" 0\n', "NOACCESS"),
            ('createType="monolithicFlat"\nCID=zz\nRW 8 FLAT "x" 0\n', "hex"),
            ('createType="monolithicFlat"\nRW 8 FLAT "x" 0\nparentFileNameHint="p.vmdk"\n',
             "parentCID"),
            ('createType="monolithicFlat"\njust some words\nRW 8 FLAT "x" 0\n', "neither"),
            ('createType="monolithicFlat"\nRW 8 ZERO "x"\n', "no file name"),
            ('createType="monolithicFlat"\nRW 8 FLAT "missing.bin" 0\n', "missing"),
            ('createType="monolithicFlat"\nRW 99999999 FLAT "x" 0\n', "past the end"),
            ('createType="monolithicFlat"\nCID=1\nCID=2\nRW 8 FLAT "x" 0\n', "twice"),
            ('createType="monolithicFlat"\nRW 8 SPARSE "x"\n', "neither a KDMV nor a COWD"),
        ],
    )
    def test_bad_descriptor(self, tmp_path: Path, text: str, words: str) -> None:
        """Descriptor mistakes are one-line errors naming the descriptor."""
        (tmp_path / "x").write_bytes(bytes(4096))
        path = tmp_path / "bad.vmdk"
        path.write_text("# Disk DescriptorFile\n" + text)
        culprit = tmp_path / "x" if words in ("past the end", "neither a KDMV nor a COWD") else path
        message = expect_error(path, culprit)
        assert words in message

    def test_oversized_descriptor(self, tmp_path: Path) -> None:
        """A multi-megabyte 'descriptor' is refused without being parsed."""
        path = tmp_path / "huge.vmdk"
        path.write_bytes(b"# Disk DescriptorFile\n" + b"#" * (2 * MiB))
        assert "too large" in expect_error(path)

    def test_bare_extents_are_refused(self, sample: Path, tmp_path: Path) -> None:
        """Delta extents and split-sparse pieces opened directly would lose their parent."""
        write_cowd(str(tmp_path / "x-delta.vmdk"), 64, 1, {})
        assert "descriptor" in expect_error(tmp_path / "x-delta.vmdk")
        write_sesparse(str(tmp_path / "x-sesparse.vmdk"), 64, {})
        assert "descriptor" in expect_error(tmp_path / "x-sesparse.vmdk")
        convert(sample, tmp_path / "split.vmdk", "twoGbMaxExtentSparse")
        assert "descriptor" in expect_error(tmp_path / "split-s001.vmdk")

    def test_forced_vmdk_on_raw(self, sample: Path) -> None:
        """--format vmdk on a raw image says it is not a VMDK."""
        assert "not a VMDK" in expect_error(sample, fmt="vmdk")


# -- detection --------------------------------------------------------------------------------


class TestDetect:
    def test_formats(self) -> None:
        """Both raw and vmdk can be forced."""
        assert "raw" in FORMATS and "vmdk" in FORMATS

    def test_detects_every_kind(self, sample: Path, tmp_path: Path) -> None:
        """KDMV, COWD and SEsparse magic and text descriptors are VMDK; a raw disk is not."""
        sparse = convert(sample, tmp_path / "s.vmdk", "monolithicSparse")
        flat = convert(sample, tmp_path / "f.vmdk", "monolithicFlat")
        write_cowd(str(tmp_path / "c.vmdk"), 64, 1, {})
        write_sesparse(str(tmp_path / "e.vmdk"), 64, {})
        for p in (sparse, flat, tmp_path / "c.vmdk", tmp_path / "e.vmdk"):
            assert detect_format(str(p), p.read_bytes()[:4096]) == "vmdk", p
        assert detect_format("x", sample.read_bytes()[:4096]) == "raw"
        assert detect_format("x", tmp_path.joinpath("f-flat.vmdk").read_bytes()[:4096]) == "raw"
        assert not looks_like_vmdk(b"hello\0world createType=")
        assert looks_like_vmdk(b'version=1\ncreateType="vmfs"\n')
        # descriptor-like text, then binary: a disk image, not qemu's few leftover bytes
        assert not looks_like_vmdk(b'createType="vmfs"\n\0' + bytes(range(1, 200)))

    def test_descriptor_with_qemus_leftovers_after_its_nul(
        self, sample: Path, tmp_path: Path
    ) -> None:
        """A descriptor with bytes after its NUL, as qemu leaves it, is still that VMDK.

        qemu rewrites the CID on the first write, printed without leading
        zeros: one descriptor in sixteen gets shorter and keeps the old
        text's last bytes after the new NUL.  These were detected as raw,
        and their 512 bytes ingested as the disk.
        """
        path = convert(sample, tmp_path / "d.vmdk", "monolithicFlat")
        text = path.read_bytes().partition(b"\0")[0]  # qemu's, with whatever CID it chose
        assert re.search(rb"\nCID=[0-9a-f]+\n", text), text
        created = re.sub(rb"\nCID=[0-9a-f]+\n", b"\nCID=000b13b3\n", text)  # eight digits
        shorter = created.replace(b"\nCID=000b13b3\n", b"\nCID=b13b3\n")  # rewritten: %x
        stale = created[len(shorter) + 1 :]  # the old text's tail, beyond the new one's NUL
        path.write_bytes((shorter + b"\0" + stale).ljust(512, b"\0"))
        assert path.read_bytes().rstrip(b"\0").count(b"\0") == 1
        with check(path, "monolithicFlat") as src:  # qemu, the reference, reads it as a VMDK too
            assert src.chain() == [str(path), str(tmp_path / "d-flat.vmdk")]


# -- fuzzing ----------------------------------------------------------------------------------

FUZZ = settings(max_examples=150, deadline=2000, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])


FuzzImage = tuple[Path, Path, bytes, tuple[int, ...]]
"""``(file to damage, file to open, pristine bytes, offsets where metadata lives)``"""


@pytest.fixture(scope="module")
def fuzz_images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, FuzzImage]:
    """Small images of each sparse flavour (and ESXi deltas) for the damage fuzzer."""
    base = tmp_path_factory.mktemp("fuzz")
    raw = base / "r.raw"
    data = bytearray(MiB + 1536)
    data[: 200 * KiB] = random.Random(9).randbytes(200 * KiB)
    data[-3000:] = b"tail" * 750
    raw.write_bytes(data)
    images: dict[str, FuzzImage] = {}
    for sub in ("monolithicSparse", "streamOptimized"):
        path = convert(raw, base / f"{sub}.vmdk", sub)
        images[sub] = (path, path, path.read_bytes(), (0,))
    path = base / "v.vmdk"
    write_stream_optimized(str(path), bytes(data), name="v.vmdk", grain=16)
    images["vmwareStream"] = (path, path, path.read_bytes(), (0, path.stat().st_size - 3 * KiB))
    sectors = 2048
    (base / "b-flat.vmdk").write_bytes(bytes(data[: sectors * 512]))
    (base / "b.vmdk").write_text(descriptor("vmfs", [f'RW {sectors} VMFS "b-flat.vmdk"'], cid=1))
    rnd = random.Random(10)
    write_cowd(str(base / "c-delta.vmdk"), sectors, 1,
               {i: rnd.randbytes(512) for i in range(0, sectors, 37)})
    (base / "c.vmdk").write_text(descriptor(
        "vmfsSparse", [f'RW {sectors} VMFSSPARSE "c-delta.vmdk"'], cid=2, parent_cid=1,
        parent_hint="b.vmdk"))
    images["cowd"] = (base / "c-delta.vmdk", base / "c.vmdk",
                      (base / "c-delta.vmdk").read_bytes(), (0,))
    grains: dict[int, bytes | int] = {i: rnd.randbytes(4096) for i in range(0, 256, 7)}
    grains |= {3: SESPARSE_ZERO, 5: SESPARSE_UNMAPPED}
    write_sesparse(str(base / "e-sesparse.vmdk"), sectors, grains)
    (base / "e.vmdk").write_text(descriptor(
        "seSparse", [f'RW {sectors} SESPARSE "e-sesparse.vmdk"'], cid=3, parent_cid=1,
        parent_hint="b.vmdk"))
    images["sesparse"] = (base / "e-sesparse.vmdk", base / "e.vmdk",
                          (base / "e-sesparse.vmdk").read_bytes(), (0, 0x4000 * 512))
    return images


def parses_or_names_file(parse: Callable[[bytes, str], object], *bufs: bytes) -> None:
    """Each buffer parses as a header, or fails with a SourceError naming the file."""
    for buf in bufs:
        try:
            parse(buf, "f.vmdk")
        except SourceError as exc:
            assert "f.vmdk" in str(exc)


class TestFuzz:
    @FUZZ
    @given(st.binary(min_size=0, max_size=600))
    def test_sparse_header_parser(self, data: bytes) -> None:
        """Arbitrary bytes after the magic give a header or a SourceError."""
        parses_or_names_file(parse_sparse_header, data, b"KDMV" + data)

    @FUZZ
    @given(st.binary(min_size=0, max_size=2100))
    def test_cowd_header_parser(self, data: bytes) -> None:
        """Arbitrary COWD headers give a header or a SourceError."""
        parses_or_names_file(parse_cowd_header, data, b"COWD\x01\0\0\0" + data)

    @FUZZ
    @given(st.binary(min_size=0, max_size=600))
    def test_sesparse_header_parser(self, data: bytes) -> None:
        """Arbitrary SEsparse headers give a header or a SourceError."""
        parses_or_names_file(
            parse_sesparse_header, data, struct.pack("<QQ", 0xCAFEBABE, 0x200000001) + data
        )

    @FUZZ
    @given(st.one_of(
        st.binary(max_size=400),
        st.lists(st.sampled_from([
            'createType="vmfs"', 'CID=fffffffe', 'parentCID=ffffffff', 'CID=12345678',
            'parentFileNameHint="p.vmdk"', 'RW 8 FLAT "x" 0', 'RW 99999999999999999999 ZERO',
            'RDONLY 1 SPARSE "y"', 'RW 8 VMFS "z" 12', '# c', '', 'ddb.x = "1"', '=', 'RW',
            'parentCID=1', 'isNativeSnapshot="yes"', 'version=3', '\0', '\udcff',
        ]), max_size=12).map(lambda lines: "\n".join(lines).encode("utf-8", "surrogateescape")),
    ))
    def test_descriptor_parser(self, data: bytes) -> None:
        """Arbitrary descriptor text parses or gives a one-line SourceError."""
        for embedded in (False, True):
            try:
                parse_descriptor(data, "d.vmdk", embedded=embedded)
            except SourceError as exc:
                assert "d.vmdk" in str(exc) and "\n" not in str(exc)

    @settings(max_examples=80, deadline=5000, derandomize=True,
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
    @given(kind=st.sampled_from(["monolithicSparse", "streamOptimized", "vmwareStream", "cowd",
                                 "sesparse"]),
           flips=st.lists(st.tuples(st.integers(0, 1), st.integers(0, 64 * KiB),
                                    st.integers(0, 255)), min_size=1, max_size=12),
           cut=st.one_of(st.none(), st.integers(0, 9 * MiB)))
    def test_damaged_images(self, fuzz_images: dict[str, FuzzImage], kind: str,
                            flips: list[tuple[int, int, int]], cut: int | None) -> None:
        """Random metadata damage and truncation never raise anything but SourceError,
        never hang, and never make the reader allocate more than a few MiB."""
        target, top, pristine, regions = fuzz_images[kind]
        data = bytearray(pristine)
        for region, pos, value in flips:
            pos += regions[region % len(regions)]
            if pos < len(data):
                data[pos] = value
        if cut is not None:
            del data[cut:]
        target.write_bytes(data)
        tracemalloc.start()
        try:
            with open_source(str(top), "vmdk") as src:
                assert src.size <= 1 << 50
                extents = list(src.allocated_extents())
                for o, n in extents[:64]:
                    for p in range(o, o + min(n, 4 * MiB), MiB):
                        src.read(p, min(MiB, o + n - p))
        except SourceError as exc:
            assert "\n" not in str(exc)
            assert str(target) in str(exc) or str(top) in str(exc), str(exc)
        finally:
            _, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
            target.write_bytes(pristine)
        assert peak < 48 * MiB, peak


def test_sparse_header_builder_roundtrip() -> None:
    """The test builder's header is what the parser expects (guards the builders)."""
    h = parse_sparse_header(sparse_header(capacity=100, grain=8, desc_offset=1, desc_size=20,
                                          gd_offset=30, overhead=64, flags=0x30001, compress=1),
                            "x")
    assert (h.capacity, h.grain, h.gd_offset, h.compressed) == (100, 8, 30, True)
