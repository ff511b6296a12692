"""The README's file-level restore, done the way an administrator does it.

The flat VMDK's partitions are attached with offset loop devices (this
kernel makes no partition nodes for ``losetup -P`` and has no in-kernel FAT
or NTFS), checked with e2fsck, and read with mount, mtools and ntfs-3g.
"""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.helpers import ingest, mounted, qemu_compare
from tools.sample_disk import build, partition_offsets


@contextlib.contextmanager
def loop(flat: Path, offset: int, size: int) -> Iterator[str]:
    dev = subprocess.run(
        ["losetup", "-f", "--show", "-r", "-o", str(offset), "--sizelimit", str(size), str(flat)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    try:
        yield dev
    finally:
        subprocess.run(["losetup", "-d", dev], capture_output=True)


@contextlib.contextmanager
def fs_mount(cmd: list[str], target: Path) -> Iterator[Path]:
    target.mkdir(exist_ok=True)
    subprocess.run([*cmd, str(target)], check=True, capture_output=True)
    try:
        yield target
    finally:
        subprocess.run(["umount", str(target)], capture_output=True)


@pytest.fixture(scope="module")
def two_days(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path, list[str]]:
    tmp = tmp_path_factory.mktemp("walk")
    from tests.support.helpers import repofs

    repo = tmp / "repo"
    repofs("init", repo)
    day1, day2 = tmp / "day1.img", tmp / "day2.img"
    build(day1, 1)
    build(day2, 2)
    ids = [ingest(repo, "sample", f"disk0={day1}"), ingest(repo, "sample", f"disk0={day2}")]
    return repo, day1, day2, ids


def test_each_restore_point_is_its_own_full_image(
    tmp_path: Path, two_days: tuple[Path, Path, Path, list[str]]
) -> None:
    """Both restore points read back identical to the disk of their day."""
    repo, day1, day2, ids = two_days
    with mounted(repo, tmp_path / "mnt") as mnt:
        qemu_compare(day1, mnt / "sample" / ids[0] / "disk0.vmdk")
        qemu_compare(day2, mnt / "sample" / ids[1] / "disk0.vmdk")


def test_files_come_out_of_every_partition(
    tmp_path: Path, two_days: tuple[Path, Path, Path, list[str]]
) -> None:
    """ext4 on a read-only offset loop device (fsck, mount), FAT by mtools, NTFS by ntfs-3g."""
    repo, _d1, _d2, ids = two_days
    with mounted(repo, tmp_path / "mnt") as mnt:
        for day, rp in enumerate(ids, start=1):
            flat = mnt / "sample" / rp / "disk0-flat.vmdk"
            (fat_off, _fat_size), (ext_off, ext_size), (ntfs_off, ntfs_size) = partition_offsets(
                flat
            )
            grub = subprocess.run(
                ["mtype", "-i", f"{flat}@@{fat_off}", "::/EFI/grub.cfg"],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            assert f"sample version {day}" in grub
            with loop(flat, ext_off, ext_size) as dev:
                fsck = subprocess.run(["e2fsck", "-fn", dev], capture_output=True, text=True)
                assert fsck.returncode == 0, fsck.stdout + fsck.stderr
                with fs_mount(["mount", "-o", "ro,noload", dev], tmp_path / "ext") as root:
                    assert (root / "etc" / "hostname").read_text() == f"sample-vm-{day}\n"
            with (
                loop(flat, ntfs_off, ntfs_size) as dev,
                fs_mount(["ntfs-3g", "-o", "ro", dev], tmp_path / "ntfs") as data,
            ):
                assert (data / "readme.txt").read_text() == f"NTFS data volume, version {day}\n"
