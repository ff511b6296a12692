"""A file that image metadata names is read only when the administrator vouched for the image.

The guest writes every byte of its raw disk, so it can make the disk's first
and last sectors look like any image format.  If content alone chose the
reader, a guest could name a host file as its backing file, extent or parent,
and its backup would hold that file instead of the guest's data, readable by
whoever may restore the VM (qemu's CVE-2008-2004).  These are that attack and
its variants, through the real CLI, as files and as loop block devices, and
the ways an administrator allows a real chain: ``--format`` and ``--backing-dir``.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import struct
import subprocess
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.helpers import assert_one_line_error, ingest, mounted, needs_loop, repofs
from tests.support.imgfmt import build_vhd, build_vhdx, read_data_write_guid
from tests.support.vmdk_builders import descriptor, sparse_header

pytestmark = pytest.mark.skipif(
    shutil.which("qemu-img") is None, reason="qemu-img (apt package qemu-utils) makes the images"
)

MiB = 1 << 20
#: What a guest disk holds where no attack structure is.
GUEST_SEED = 18
#: Exit status of bad input (SourceError).
BAD_SOURCE = 4


def qemu_img(*args: str | Path) -> str:
    proc = subprocess.run(["qemu-img", *map(str, args)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@dataclass
class Host:
    """A hypervisor's files: guest disks in ``pool``, and files no guest may read in ``host``."""

    pool: Path
    host: Path
    secret: Path

    def other_disk(self, fmt: str) -> Path:
        """Another VM's disk (holding the secret) in ``host``, in qemu format ``fmt``."""
        path = self.host / f"other.{fmt}"
        if not path.exists():
            opts = ["-o", "force_size=on"] if fmt == "vpc" else []
            qemu_img("convert", "-f", "raw", "-O", fmt, *opts, self.secret, path)
        return path


@pytest.fixture
def host(tmp_path: Path) -> Host:
    pool, secrets = tmp_path / "pool", tmp_path / "host"
    pool.mkdir()
    secrets.mkdir()
    secret = secrets / "secret"
    secret.write_bytes(b"a host file no guest may read\n".ljust(64, b".") * (MiB // 64))
    return Host(pool, secrets, secret)


def guest_disk(path: Path, size: int, head: bytes, tail: bytes = b"") -> Path:
    """A raw guest disk: the guest's data, ``head`` written at its start, ``tail`` at its end."""
    data = bytearray(random.Random(GUEST_SEED).randbytes(size))
    data[: len(head)] = head
    if tail:
        data[-len(tail) :] = tail
    path.write_bytes(data)
    return path


# -- the attack: a raw disk that looks like an image naming a host file ---------------------
# Each builder writes pool/<name>.img and returns it with the reference as the metadata names it.

Attack = Callable[[Host, Path], str]


def qcow2_backing(backing: str | None) -> Attack:
    def build(host: Host, disk: Path) -> str:
        name = backing or str(host.secret)
        hdr = host.pool / "hdr.qcow2"
        qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", name, "-F", "raw", hdr, "1M")
        guest_disk(disk, 4 * MiB, hdr.read_bytes())
        hdr.unlink()
        return name

    return build


def qcow2_data_file(host: Host, disk: Path) -> str:
    """qcow2 v3 with an external data file (data_file_raw: every cluster mapped into it)."""
    decoy = host.host.with_name("hxst")  # as long a path as the secret's, to patch in place
    decoy.mkdir()
    hdr = host.pool / "hdr.qcow2"
    target = decoy / "secret"
    qemu_img("create", "-q", "-f", "qcow2", "-o", f"data_file={target},data_file_raw=on", hdr, "1M")
    head = hdr.read_bytes().replace(os.fsencode(target), os.fsencode(host.secret))
    hdr.unlink()
    shutil.rmtree(decoy)
    guest_disk(disk, 4 * MiB, head)
    return str(host.secret)


def vmdk_descriptor(relative: bool) -> Attack:
    """A text descriptor in the first sector of a 1 MiB disk (small enough to be one)."""

    def build(host: Host, disk: Path) -> str:
        name = "../host/secret" if relative else str(host.secret)
        text = descriptor("monolithicFlat", [f'RW 2048 FLAT "{name}" 0']).encode()
        guest_disk(disk, MiB, text.ljust(4096, b"\0"))
        return name

    return build


def vmdk_sparse_container(host: Host, disk: Path) -> str:
    """A KDMV header of capacity 0 whose descriptor names a FLAT extent: any disk size."""
    name = "../host/secret"
    text = descriptor("monolithicFlat", [f'RW 2048 FLAT "{name}" 0']).encode()
    header = sparse_header(capacity=0, grain=128, desc_offset=1, desc_size=2, gd_offset=0,
                           overhead=0, flags=1, compress=0)
    guest_disk(disk, 4 * MiB, header + text.ljust(1024, b"\0"))
    return name


def vmdk_parent(host: Host, disk: Path) -> str:
    """A monolithicSparse delta, all grains unallocated, whose parent is another VM's disk."""
    other = host.other_disk("vmdk")
    cid = int(re.search(rb"\nCID=([0-9a-f]+)", other.read_bytes()[:65536]).group(1), 16)
    name = str(other)
    text = descriptor("monolithicSparse", ['RW 2048 SPARSE "x.vmdk"'], cid=0x11,
                      parent_cid=cid, parent_hint=name).encode()
    header = sparse_header(capacity=2048, grain=128, desc_offset=1, desc_size=3, gd_offset=4,
                           overhead=128, flags=1, compress=0)
    guest_disk(disk, 4 * MiB, header + text.ljust(1536, b"\0") + bytes(512))
    return name


def vhd_differencing(code: bytes, relative: bool) -> Attack:
    """A differencing VHD's footer copy, header and locator at the start, its footer at the end."""

    def build(host: Host, disk: Path) -> str:
        other = host.other_disk("vpc")
        name = "..\\host\\other.vpc" if relative else str(other)
        uid = other.read_bytes()[-512 + 68 : -512 + 84]
        image = host.pool / "hdr.vhd"
        build_vhd(image, MiB, [], parent=(uuid.UUID(bytes=uid), {code: name.encode("utf-16-le")},
                                          "other.vpc"))
        data = image.read_bytes()
        image.unlink()
        guest_disk(disk, 4 * MiB, data[:-512], data[-512:])
        return name

    return build


def vhdx_differencing(host: Host, disk: Path) -> str:
    """A differencing VHDX's headers, regions, metadata and BAT in the first 4 MiB."""
    other = host.other_disk("vhdx")
    name = "..\\host\\other.vhdx"
    image = host.pool / "hdr.vhdx"
    linkage = "{" + str(read_data_write_guid(other)) + "}"
    build_vhdx(image, MiB, [], parent={"parent_linkage": linkage, "relative_path": name})
    guest_disk(disk, 8 * MiB, image.read_bytes())
    image.unlink()
    return name


ATTACKS: dict[str, Attack] = {
    "qcow2-backing-etc-shadow": qcow2_backing("/etc/shadow"),
    "qcow2-backing-absolute": qcow2_backing(None),
    "qcow2-backing-relative": qcow2_backing("../host/secret"),
    "qcow2-data-file": qcow2_data_file,
    "vmdk-descriptor-absolute": vmdk_descriptor(relative=False),
    "vmdk-descriptor-relative": vmdk_descriptor(relative=True),
    "vmdk-sparse-container": vmdk_sparse_container,
    "vmdk-parent": vmdk_parent,
    "vhd-w2ku-absolute": vhd_differencing(b"W2ku", relative=False),
    "vhd-w2ru-relative": vhd_differencing(b"W2ru", relative=True),
    "vhdx-relative-path": vhdx_differencing,
}


def repo_files(repo: Path) -> dict[str, int]:
    return {
        str(p.relative_to(repo)): p.stat().st_size for p in sorted(repo.rglob("*")) if p.is_file()
    }


def assert_refused(proc: subprocess.CompletedProcess[str], reference: str, repo: Path,
                   before: dict[str, int]) -> str:
    """One line naming the reference and both ways to allow it; nothing written."""
    assert_one_line_error(proc, repr(reference), "--format", "--backing-dir")
    assert proc.returncode == BAD_SOURCE
    assert repo_files(repo) == before
    assert json.loads(repofs("list", repo, "--json").stdout) == []
    return proc.stderr


@pytest.fixture
def loop() -> Iterator[Callable[[Path], str]]:
    """Attach files as read-only loop devices; every one is detached afterwards."""
    attached: list[str] = []

    def attach(path: Path) -> str:
        proc = subprocess.run(["losetup", "--find", "--show", "--read-only", str(path)],
                              capture_output=True, text=True, check=True)
        attached.append(proc.stdout.strip())
        return attached[-1]

    try:
        yield attach
    finally:
        for dev in attached:
            subprocess.run(["losetup", "--detach", dev], capture_output=True, check=False)


class TestHostileRawDisk:
    @pytest.mark.parametrize("attack", ATTACKS)
    def test_refused_without_format(self, host: Host, repo: Path, attack: str) -> None:
        """A raw disk made to look like an image naming a host file is refused, nothing stored."""
        disk = host.pool / f"{attack}.img"
        reference = ATTACKS[attack](host, disk)
        before = repo_files(repo)
        proc = repofs("ingest", repo, "--vm", "guest", f"d={disk}", check=False)
        assert_refused(proc, reference, repo, before)
        # Naming the pool does not help: the file is outside it.
        proc = repofs("ingest", repo, "--vm", "guest", f"d={disk}", "--backing-dir", host.pool,
                      check=False)
        assert_refused(proc, reference, repo, before)

    @needs_loop
    def test_stored_as_raw_bytes(self, host: Host, repo: Path, tmp_path: Path,
                                 loop: Callable[[Path], str]) -> None:
        """With --format raw, and as a block device without it, the disk's own bytes are stored."""
        stored: list[tuple[str, str, Path]] = []
        notes: list[tuple[str, str]] = []
        for i, attack in enumerate(ATTACKS):
            disk = host.pool / f"{attack}.img"
            ATTACKS[attack](host, disk)
            rp = ingest(repo, f"file{i}", f"d={disk}", extra=("--format", "raw"))
            stored.append((f"file{i}", rp, disk))
            dev = loop(disk)
            proc = repofs("ingest", repo, "--vm", f"dev{i}", f"d={dev}")
            stored.append((f"dev{i}", proc.stdout.strip().splitlines()[-1], disk))
            notes.append((dev, proc.stderr))
        listed = json.loads(repofs("list", repo, "--json").stdout)
        assert {rp["disks"][0]["format"] for rp in listed} == {"raw"}
        for dev, stderr in notes:
            assert f"d: {dev} is read as raw: no --format given" in stderr
        with mounted(repo, tmp_path / "mnt") as mnt:
            for vm, rp, disk in stored:
                flat = mnt / vm / rp / "d-flat.vmdk"
                assert flat.read_bytes() == disk.read_bytes(), (vm, disk)


    def test_qemu_bitmap_of_a_disk_read_as_raw(self, host: Host, repo: Path) -> None:
        """A qemu bitmap is not read from a raw disk: qemu would probe the guest's fake qcow2."""
        hdr = host.pool / "hdr.qcow2"
        qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", "../host/secret", "-F", "raw", hdr,
                 "4M")
        qemu_img("bitmap", "--add", hdr, "b0")
        disk = guest_disk(host.pool / "guest.img", 4 * MiB, hdr.read_bytes())
        ingest(repo, "guest", f"d={disk}", extra=("--format", "raw"))
        before = repo_files(repo)
        proc = repofs("ingest", repo, "--vm", "guest", f"d={disk}", "--format", "raw",
                      "--changed-blocks", "d=qemu-bitmap:b0", check=False)
        assert_one_line_error(proc, "reads a qcow2 bitmap", "read as raw")
        assert proc.returncode == BAD_SOURCE and repo_files(repo) == before


class TestVouching:
    """--format (for every disk or one) and --backing-dir: how a real chain is ingested."""

    @pytest.fixture
    def chain(self, host: Host) -> Path:
        """base.qcow2 <- top.qcow2 in the pool, named relatively, as libvirt makes them."""
        base = host.pool / "base.qcow2"
        qemu_img("convert", "-f", "raw", "-O", "qcow2", host.secret, base)
        top = host.pool / "top.qcow2"
        qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", top)
        subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 64k 64k", str(top)],
                       check=True, capture_output=True)
        return top

    def test_chain_with_format_or_backing_dir(self, host: Host, repo: Path, tmp_path: Path,
                                              chain: Path) -> None:
        """Refused as detected; read through with --format, DISK=FORMAT or --backing-dir."""
        before = repo_files(repo)
        proc = repofs("ingest", repo, "--vm", "vm", f"d={chain}", check=False)
        assert "--format qcow2" in assert_refused(proc, "base.qcow2", repo, before)
        link = tmp_path / "pool-link"
        link.symlink_to(host.pool)
        rps = [
            ingest(repo, "vm", f"d={chain}", extra=("--format", "qcow2")),
            ingest(repo, "vm", f"d={chain}", extra=("--format", "d=qcow2")),
            ingest(repo, "vm", f"d={chain}", extra=("--backing-dir", str(host.pool))),
            ingest(repo, "vm", f"d={chain}", extra=("--backing-dir", str(link))),
        ]
        with mounted(repo, tmp_path / "mnt") as mnt:
            for rp in rps:
                proc = subprocess.run(
                    ["qemu-img", "compare", str(chain), str(mnt / "vm" / rp / "d.vmdk")],
                    capture_output=True, text=True,
                )
                assert proc.returncode == 0, proc.stdout + proc.stderr

    def test_backing_dir_is_checked_after_symlinks(self, host: Host, repo: Path) -> None:
        """A name inside the backing directory that is a symlink to a host file is refused."""
        (host.pool / "base.raw").symlink_to(host.secret)
        top = host.pool / "top.qcow2"
        qemu_img("create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", top)
        before = repo_files(repo)
        proc = repofs("ingest", repo, "--vm", "vm", f"d={top}", "--backing-dir", host.pool,
                      check=False)
        assert f"resolves to {host.secret}" in assert_refused(proc, "base.raw", repo, before)

    def test_a_directory_sharing_the_prefix_is_outside(self, host: Host, repo: Path) -> None:
        """--backing-dir /x/pool does not allow /x/pool2/base."""
        pool2 = host.pool.with_name("pool2")
        pool2.mkdir()
        qemu_img("convert", "-f", "raw", "-O", "qcow2", host.secret, pool2 / "base.qcow2")
        top = host.pool / "top.qcow2"
        qemu_img("create", "-q", "-f", "qcow2", "-b", "../pool2/base.qcow2", "-F", "qcow2", top)
        before = repo_files(repo)
        proc = repofs("ingest", repo, "--vm", "vm", f"d={top}", "--backing-dir", host.pool,
                      check=False)
        assert_refused(proc, "../pool2/base.qcow2", repo, before)
        ingest(repo, "vm", f"d={top}", extra=("--backing-dir", str(pool2)))

    def test_a_detected_backing_file_is_not_vouched_for(self, host: Host, repo: Path) -> None:
        """--format vouches for the disk and the formats its metadata states, not for content.

        A qcow2 overlay whose backing file has no recorded format over a raw
        guest disk: the guest's fake qcow2 header there names /etc/shadow.
        """
        guest = host.pool / "guest.img"
        qcow2_backing("/etc/shadow")(host, guest)
        top = host.pool / "top.qcow2"
        qemu_img("create", "-q", "-f", "qcow2", "-b", "guest.img", "-F", "raw", top)
        data = bytearray(top.read_bytes())
        pos = data.index(struct.pack(">I", 0xE2792ACA))  # the backing format extension ...
        data[pos : pos + 4] = struct.pack(">I", 0x7E57E57E)  # ... made one qemu skips
        top.write_bytes(data)
        before = repo_files(repo)
        for extra in (["--format", "qcow2"], ["--format", "qcow2", "--backing-dir", host.pool]):
            proc = repofs("ingest", repo, "--vm", "vm", f"d={top}", *extra, check=False)
            assert_one_line_error(proc, "'/etc/shadow'", "detected from its content",
                                  "--backing-dir")
            assert proc.returncode == BAD_SOURCE and repo_files(repo) == before

    def test_format_per_disk(self, host: Host, repo: Path, chain: Path) -> None:
        """DISK=FORMAT vouches for that disk only; a bare FORMAT for the others."""
        hostile = host.pool / "guest.img"
        reference = qcow2_backing("../host/secret")(host, hostile)
        before = repo_files(repo)
        disks = (f"a={chain}", f"b={hostile}")
        proc = repofs("ingest", repo, "--vm", "vm", *disks, "--format", "a=qcow2", check=False)
        assert_refused(proc, reference, repo, before)
        ingest(repo, "vm", *disks, extra=("--format", "a=qcow2", "--format", "b=raw"))
        ingest(repo, "vm", *disks, extra=("--format", "raw", "--format", "a=qcow2"))
        for rp in json.loads(repofs("list", repo, "--json").stdout):
            assert [d["format"] for d in rp["disks"]] == ["qcow2", "raw"]

    @pytest.mark.parametrize(
        ("options", "words"),
        [
            (["--format", "zip"], "unknown format 'zip'"),
            (["--format", "x=qcow2"], "disk 'x'"),
            (["--format", "d=raw", "--format", "d=qcow2"], "twice"),
            (["--format", "raw", "--format", "qcow2"], "twice"),
            (["--backing-dir", "/nonexistent/dir"], "not a directory"),
        ],
    )
    def test_bad_options(self, host: Host, repo: Path, chain: Path, options: list[str],
                         words: str) -> None:
        """Mistakes in --format and --backing-dir are usage errors, before anything is read."""
        proc = repofs("ingest", repo, "--vm", "vm", f"d={chain}", *options, check=False)
        assert_one_line_error(proc, words)
        assert proc.returncode == 2

    def test_detected_format_is_printed(self, host: Host, repo: Path) -> None:
        """A detected format is named on stderr; the restore point id stays the last line."""
        image = host.pool / "self.qcow2"
        qemu_img("convert", "-f", "raw", "-O", "qcow2", host.secret, image)
        proc = repofs("ingest", repo, "--vm", "vm", f"d={image}")
        assert f"d: {image} is read as qcow2: no --format given" in proc.stderr
        rp = proc.stdout.strip().splitlines()[-1]
        assert rp == json.loads(repofs("list", repo, "--json").stdout)[0]["id"]
        proc = repofs("ingest", repo, "--vm", "vm", f"d={image}", "--format", "qcow2")
        assert "is read as" not in proc.stderr
