"""Every source format through the real CLI and mount, with qemu's reader as the reference."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.support.helpers import assert_one_line_error, ingest, make_image, mounted, repofs
from tests.support.vmdk_builders import write_mkimg_sparse

MiB = 1 << 20


def qemu(*args: str) -> None:
    subprocess.run(["qemu-img", *args], check=True, capture_output=True)


def qemu_io(image: Path, *commands: str, fmt: str) -> None:
    cmd = ["qemu-io", "-f", fmt]
    for c in commands:
        cmd += ["-c", c]
    subprocess.run([*cmd, str(image)], check=True, capture_output=True)


def compare_with_qemu(source: Path, exposed: Path) -> None:
    """The exposed VMDK equals qemu's reading of the source (its format detected by qemu)."""
    proc = subprocess.run(
        ["qemu-img", "compare", str(source), str(exposed)], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.fixture
def base_raw(tmp_path: Path) -> Path:
    """Random, zero and repeated data, of a size that is no multiple of 64 KiB."""
    return make_image(
        tmp_path / "base.raw",
        6 * MiB + 1536,
        [
            (0, os.urandom(MiB)),
            (2 * MiB + 100, b"repeat" * 50000),
            (6 * MiB, os.urandom(1536)),
        ],
    )


VMDK_SUBFORMATS = [
    "monolithicSparse",
    "monolithicFlat",
    "twoGbMaxExtentSparse",
    "twoGbMaxExtentFlat",
    "streamOptimized",
]


def _set_vhd_current_size(path: Path, size: int) -> None:
    """Write ``size`` into every footer of a qemu-made VHD (creator 'qem2': qemu trusts it)."""
    total = path.stat().st_size
    with open(path, "r+b") as f:
        for off in sorted({0, total - 512}):
            f.seek(off)
            footer = bytearray(f.read(512))
            if footer[:8] != b"conectix":
                continue  # a fixed VHD has its footer only at the end
            footer[48:56] = size.to_bytes(8, "big")  # current size
            footer[64:68] = bytes(4)
            footer[64:68] = (~sum(footer) & 0xFFFFFFFF).to_bytes(4, "big")
            f.seek(off)
            f.write(footer)


class TestVmdk:
    @pytest.mark.parametrize("subformat", VMDK_SUBFORMATS)
    def test_subformats(self, tmp_path: Path, repo: Path, base_raw: Path, subformat: str) -> None:
        """Each VMDK subformat qemu writes is detected, ingested and reads back identical.

        The split and flat ones name their extents: --backing-dir allows those."""
        src = tmp_path / f"{subformat}.vmdk"
        qemu(
            "convert",
            "-f",
            "raw",
            "-O",
            "vmdk",
            "-o",
            f"subformat={subformat}",
            str(base_raw),
            str(src),
        )
        rp = ingest(repo, "v", f"d={src}", extra=("--backing-dir", str(tmp_path)))
        info = json.loads(repofs("list", repo, "--json").stdout)[0]["disks"][0]
        assert info["format"] == f"vmdk:{subformat}"
        with mounted(repo, tmp_path / "mnt") as mnt:
            compare_with_qemu(src, mnt / "v" / rp / "d.vmdk")

    def test_snapshot_chain(self, tmp_path: Path, repo: Path, base_raw: Path) -> None:
        """A child delta is read through its parent, as a VM running on a snapshot."""
        parent = tmp_path / "parent.vmdk"
        child = tmp_path / "child.vmdk"
        qemu("convert", "-f", "raw", "-O", "vmdk", str(base_raw), str(parent))
        qemu("create", "-f", "vmdk", "-b", str(parent), "-F", "vmdk", str(child))
        qemu_io(child, "write -P 0x5a 1M 64k", "write -P 0x11 5M 4k", fmt="vmdk")
        rp = ingest(repo, "v", f"d={child}", extra=("--format", "vmdk"))
        chain = json.loads(repofs("list", repo, "--json").stdout)[0]["disks"][0]
        assert chain["format"].startswith("vmdk")
        with mounted(repo, tmp_path / "mnt") as mnt:
            compare_with_qemu(child, mnt / "v" / rp / "d.vmdk")

    def test_freebsd_mkimg_vmdk(self, tmp_path: Path, repo: Path, base_raw: Path) -> None:
        """mkimg's monolithicSparse (its extent named ``""``) is ingested as qemu reads it."""
        raw = base_raw.read_bytes()
        raw = raw.ljust(-(-len(raw) // MiB) * MiB, b"\0")
        plain = make_image(tmp_path / "FreeBSD.raw", len(raw), [(0, raw)])
        src = tmp_path / "FreeBSD.vmdk"
        write_mkimg_sparse(str(src), raw)
        info = json.loads(
            subprocess.run(
                ["qemu-img", "info", "--output=json", str(src)],
                check=True, capture_output=True, text=True,
            ).stdout
        )
        assert info["format"] == "vmdk" and info["virtual-size"] == len(raw)
        compare_with_qemu(src, plain)
        rp = ingest(repo, "v", f"d={src}")  # self-contained: detection needs no option
        disk = json.loads(repofs("list", repo, "--json").stdout)[0]["disks"][0]
        assert disk["format"] == "vmdk:monolithicSparse"
        with mounted(repo, tmp_path / "mnt") as mnt:
            assert (mnt / "v" / rp / "d-flat.vmdk").read_bytes() == raw
            compare_with_qemu(src, mnt / "v" / rp / "d.vmdk")

    def test_broken_vmdk_is_refused(self, tmp_path: Path, repo: Path, base_raw: Path) -> None:
        """A truncated sparse VMDK and a chain with a missing parent: one line, no restore point."""
        src = tmp_path / "cut.vmdk"
        qemu("convert", "-f", "raw", "-O", "vmdk", str(base_raw), str(src))
        os.truncate(src, src.stat().st_size // 3)
        assert_one_line_error(
            repofs("ingest", repo, "--vm", "v", f"d={src}", check=False), "cut.vmdk"
        )
        parent, child = tmp_path / "p.vmdk", tmp_path / "c.vmdk"
        qemu("create", "-f", "vmdk", str(parent), "8M")
        qemu("create", "-f", "vmdk", "-b", str(parent), "-F", "vmdk", str(child))
        parent.unlink()
        assert_one_line_error(
            repofs("ingest", repo, "--vm", "v", f"d={child}", "--format", "vmdk", check=False),
            "p.vmdk",
            "not found",
        )
        assert json.loads(repofs("list", repo, "--json").stdout) == []

    def test_format_override(self, tmp_path: Path, repo: Path, base_raw: Path) -> None:
        """--format raw takes a VMDK file's bytes as they are; an unknown format is refused."""
        src = tmp_path / "s.vmdk"
        qemu("convert", "-f", "raw", "-O", "vmdk", str(base_raw), str(src))
        ingest(repo, "v", f"d={src}", extra=("--format", "raw"))
        assert json.loads(repofs("list", repo, "--json").stdout)[0]["disks"][0]["format"] == "raw"
        assert_one_line_error(
            repofs("ingest", repo, "--vm", "v", f"d={src}", "--format", "zip", check=False),
            "unknown format",
        )


QEMU_SOURCES = [
    ("qcow2", ["-O", "qcow2", "-o", "compat=0.10"], "qcow2"),
    ("qcow2", ["-O", "qcow2", "-o", "compat=1.1,cluster_size=4096"], "qcow2"),
    ("qcow2", ["-O", "qcow2", "-c", "-o", "compression_type=zstd"], "qcow2"),
    ("qcow2", ["-O", "qcow2", "-o", "extended_l2=on"], "qcow2"),
    ("vhd", ["-O", "vpc", "-o", "subformat=dynamic"], "vhd"),
    ("vhd", ["-O", "vpc", "-o", "subformat=fixed"], "vhd"),
    ("vhdx", ["-O", "vhdx", "-o", "subformat=dynamic"], "vhdx"),
    ("vhdx", ["-O", "vhdx", "-o", "subformat=fixed"], "vhdx"),
]


class TestQemuFormats:
    @pytest.mark.parametrize(
        "ext,args,fmt", QEMU_SOURCES, ids=[" ".join(a[1:]) for _, a, _ in QEMU_SOURCES]
    )
    def test_detected_and_identical(
        self, tmp_path: Path, repo: Path, base_raw: Path, ext: str, args: list[str], fmt: str
    ) -> None:
        """qcow2, VHD and VHDX as qemu writes them are detected, ingested and read back."""
        src = tmp_path / f"src.{ext}"
        qemu("convert", "-f", "raw", *args, str(base_raw), str(src))
        rp = ingest(repo, "v", f"d={src}")
        info = json.loads(repofs("list", repo, "--json").stdout)[0]["disks"][0]
        assert info["format"].split(":")[0] == fmt
        reference = tmp_path / "ref.raw"
        qemu_fmt = "vpc" if fmt == "vhd" else fmt
        qemu("convert", "-f", qemu_fmt, "-O", "raw", str(src), str(reference))
        with mounted(repo, tmp_path / "mnt") as mnt:
            compare_with_qemu(reference, mnt / "v" / rp / "d.vmdk")

    @pytest.mark.parametrize("kind", ["qcow2", "vhd-dynamic", "vhd-fixed"])
    def test_virtual_size_not_a_multiple_of_512(
        self, tmp_path: Path, repo: Path, kind: str
    ) -> None:
        """A header size of 8388731 bytes: descriptor and flat file both say 16385 sectors.

        qemu-img never writes such a size (it rounds up), so the header is
        edited. The flat file is the image's bytes up to the header's size,
        then zeros to the sector's end, as for a raw file of that size.
        """
        odd = 8 * MiB + 123
        whole = -(-odd // 512) * 512
        data = os.urandom(whole)  # the last cluster holds data past the header's size too
        raw = tmp_path / "src.raw"
        raw.write_bytes(data)
        src = tmp_path / f"src.{kind}"
        if kind == "qcow2":
            qemu("convert", "-f", "raw", "-O", "qcow2", str(raw), str(src))
            with open(src, "r+b") as f:
                f.seek(24)
                f.write(odd.to_bytes(8, "big"))
            qemu_fmt = "qcow2"
        else:
            sub = kind.split("-")[1]
            opts = f"force_size=on,subformat={sub}"
            qemu("convert", "-f", "raw", "-O", "vpc", "-o", opts, str(raw), str(src))
            _set_vhd_current_size(src, odd)
            qemu_fmt = "vpc"
        rp = ingest(repo, "v", f"d={src}")
        assert json.loads(repofs("list", repo, "--json").stdout)[0]["disks"][0]["capacity"] == whole
        reference = tmp_path / "ref.raw"
        qemu("convert", "-f", qemu_fmt, "-O", "raw", str(src), str(reference))
        ref = reference.read_bytes()  # qemu 7.2 drops the partial sector: 8388608 bytes
        with mounted(repo, tmp_path / "mnt") as mnt:
            descriptor = (mnt / "v" / rp / "d.vmdk").read_text()
            flat = (mnt / "v" / rp / "d-flat.vmdk").read_bytes()
        sectors = [int(ln.split()[1]) for ln in descriptor.splitlines() if ln.startswith("RW ")]
        assert sectors == [whole // 512] and len(flat) == whole
        assert flat == data[:odd] + bytes(whole - odd)
        shared = min(len(ref), odd)
        assert flat[:shared] == ref[:shared]

    def test_qcow2_backing_chain(self, tmp_path: Path, repo: Path, base_raw: Path) -> None:
        """A qcow2 child over a raw backing file reads through the chain."""
        child = tmp_path / "child.qcow2"
        qemu("create", "-f", "qcow2", "-b", str(base_raw), "-F", "raw", str(child))
        qemu_io(child, "write -P 0x77 3M 64k", "write -z 0 4k", fmt="qcow2")
        rp = ingest(repo, "v", f"d={child}", extra=("--format", "qcow2"))
        with mounted(repo, tmp_path / "mnt") as mnt:
            compare_with_qemu(child, mnt / "v" / rp / "d.vmdk")

    def test_looping_chain_and_bad_header(self, tmp_path: Path, repo: Path) -> None:
        """A backing chain that loops and a qcow2 header with an absurd size: one line each."""
        a, b = tmp_path / "a.qcow2", tmp_path / "b.qcow2"
        qemu("create", "-f", "qcow2", str(a), "4M")
        qemu("create", "-f", "qcow2", "-b", str(a), "-F", "qcow2", str(b))
        qemu("rebase", "-u", "-b", str(b), "-F", "qcow2", str(a))
        assert_one_line_error(
            repofs("ingest", repo, "--vm", "v", f"d={b}", "--format", "qcow2", check=False),
            "loops",
        )
        bad = tmp_path / "bad.qcow2"
        qemu("create", "-f", "qcow2", str(bad), "4M")
        with open(bad, "r+b") as f:
            f.seek(24)
            f.write((1 << 62).to_bytes(8, "big"))  # virtual size
        assert_one_line_error(
            repofs("ingest", repo, "--vm", "v", f"d={bad}", check=False), "bad.qcow2"
        )
        assert json.loads(repofs("list", repo, "--json").stdout) == []
