"""Every source format through the real CLI and mount, with qemu's reader as the reference."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.helpers import assert_one_line_error, ingest, make_image, mounted, repofs

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
    proc = subprocess.run(["qemu-img", "compare", str(source), str(exposed)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.fixture
def base_raw(tmp_path: Path) -> Path:
    """Random, zero and repeated data, of a size that is no multiple of 64 KiB."""
    return make_image(tmp_path / "base.raw", 6 * MiB + 1536, [
        (0, os.urandom(MiB)), (2 * MiB + 100, b"repeat" * 50000), (6 * MiB, os.urandom(1536)),
    ])


VMDK_SUBFORMATS = ["monolithicSparse", "monolithicFlat", "twoGbMaxExtentSparse",
                   "twoGbMaxExtentFlat", "streamOptimized"]


class TestVmdk:
    @pytest.mark.parametrize("subformat", VMDK_SUBFORMATS)
    def test_subformats(self, tmp_path: Path, repo: Path, base_raw: Path, subformat: str) -> None:
        """Each VMDK subformat qemu writes is detected, ingested and reads back identical."""
        src = tmp_path / f"{subformat}.vmdk"
        qemu("convert", "-f", "raw", "-O", "vmdk", "-o", f"subformat={subformat}", str(base_raw), str(src))
        rp = ingest(repo, "v", f"d={src}")
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
        rp = ingest(repo, "v", f"d={child}")
        chain = json.loads(repofs("list", repo, "--json").stdout)[0]["disks"][0]
        assert chain["format"].startswith("vmdk")
        with mounted(repo, tmp_path / "mnt") as mnt:
            compare_with_qemu(child, mnt / "v" / rp / "d.vmdk")

    def test_broken_vmdk_is_refused(self, tmp_path: Path, repo: Path, base_raw: Path) -> None:
        """A truncated sparse VMDK and a chain with a missing parent: one line, no restore point."""
        src = tmp_path / "cut.vmdk"
        qemu("convert", "-f", "raw", "-O", "vmdk", str(base_raw), str(src))
        os.truncate(src, src.stat().st_size // 3)
        assert_one_line_error(repofs("ingest", repo, "--vm", "v", f"d={src}", check=False), "cut.vmdk")
        parent, child = tmp_path / "p.vmdk", tmp_path / "c.vmdk"
        qemu("create", "-f", "vmdk", str(parent), "8M")
        qemu("create", "-f", "vmdk", "-b", str(parent), "-F", "vmdk", str(child))
        parent.unlink()
        assert_one_line_error(repofs("ingest", repo, "--vm", "v", f"d={child}", check=False), "p.vmdk")
        assert json.loads(repofs("list", repo, "--json").stdout) == []

    def test_format_override(self, tmp_path: Path, repo: Path, base_raw: Path) -> None:
        """--format raw takes a VMDK file's bytes as they are; an unknown format is refused."""
        src = tmp_path / "s.vmdk"
        qemu("convert", "-f", "raw", "-O", "vmdk", str(base_raw), str(src))
        ingest(repo, "v", f"d={src}", extra=("--format", "raw"))
        assert json.loads(repofs("list", repo, "--json").stdout)[0]["disks"][0]["format"] == "raw"
        assert_one_line_error(repofs("ingest", repo, "--vm", "v", f"d={src}", "--format", "zip",
                                     check=False), "unknown format")
