"""Real FUSE mounts, read by independent tools: qemu-img, tar, dd, e2fsck, mtools, losetup."""

from __future__ import annotations

import errno
import json
import mmap
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from repofs.store.config import DEFAULT_CHUNK
from tests.support.helpers import (
    _daemon_pids,
    assert_one_line_error,
    cli_argv,
    cli_env,
    ingest,
    is_mounted,
    make_image,
    mounted,
    qemu_compare,
    repofs,
    unmount,
)

MiB = 1 << 20


def _tree_inodes(root: Path) -> dict[str, tuple[int, int, int]]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            out[str(p.relative_to(root))] = (st.st_ino, st.st_mtime_ns, st.st_ctime_ns)
    return out


@pytest.fixture
def populated(tmp_path: Path, repo: Path) -> tuple[Path, Path, list[str]]:
    """A repository with two restore points of one VM; returns (repo, source image, ids)."""
    img = make_image(
        tmp_path / "src.img",
        8 * MiB + 3 * 512,
        [(0, os.urandom(MiB)), (5 * MiB + 77, b"pattern" * 9000)],
    )
    first = ingest(repo, "web", f"disk0={img}")
    with open(img, "r+b") as f:
        f.seek(3 * MiB)
        f.write(os.urandom(200_000))
    second = ingest(repo, "web", f"disk0={img}")
    return repo, img, [first, second]


@pytest.fixture
def mnt(tmp_path: Path, populated: tuple[Path, Path, list[str]]) -> Iterator[Path]:
    """The populated repository, mounted for the whole test."""
    with mounted(populated[0], tmp_path / "mnt") as where:
        yield where


class TestReading:
    def test_qemu_reads_descriptor_and_bytes(
        self, populated: tuple[Path, Path, list[str]], mnt: Path
    ) -> None:
        """qemu-img info accepts the descriptor and compare finds the flat data identical."""
        _repo, img, ids = populated
        vmdk = mnt / "web" / ids[1] / "disk0.vmdk"
        info = json.loads(
            subprocess.run(
                ["qemu-img", "info", "--output=json", str(vmdk)],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
        )
        assert info["format"] == "vmdk" and info["virtual-size"] == img.stat().st_size
        assert info["format-specific"]["data"]["create-type"] == "monolithicFlat"
        qemu_compare(img, vmdk)
        proc = subprocess.run(
            ["qemu-img", "compare", str(img), str(mnt / "web" / ids[0] / "disk0.vmdk")],
            capture_output=True,
            text=True,
        )
        assert proc.returncode == 1  # the first restore point is the older content
        assert os.readlink(mnt / "web" / "latest") == ids[1]

    @pytest.mark.parametrize("options", [(), ("--direct-io",)], ids=["page-cache", "direct-io"])
    def test_unaligned_reads_match_source(
        self, tmp_path: Path, populated: tuple[Path, Path, list[str]], options: tuple[str, ...]
    ) -> None:
        """Reads at odd offsets and sizes return exactly the source bytes, never padding."""
        repo, img, ids = populated
        src = img.read_bytes()
        rng = random.Random(7)
        with mounted(repo, tmp_path / "mnt", *options) as mnt:
            flat = mnt / "web" / ids[1] / "disk0-flat.vmdk"
            assert flat.stat().st_size == len(src)
            fd = os.open(flat, os.O_RDONLY)
            try:
                for _ in range(200):
                    off = rng.randrange(len(src))
                    size = rng.choice([1, 511, 4096, 65537, 300_000])
                    assert os.pread(fd, size, off) == src[off : off + size]
                assert os.pread(fd, 4096, len(src)) == b""
            finally:
                os.close(fd)

    def test_direct_io_mount_leaves_the_page_cache_alone(
        self, tmp_path: Path, populated: tuple[Path, Path, list[str]]
    ) -> None:
        """--direct-io: a whole-disk sweep reads the source's bytes and caches none of them.

        util-linux ``fincore`` counts the file's pages in the kernel's page
        cache; the default mount, read the same way, keeps them.
        """
        repo, img, ids = populated

        def sweep_and_count(mnt: Path) -> int:
            flat = mnt / "web" / ids[1] / "disk0-flat.vmdk"
            out = subprocess.run(
                ["dd", f"if={flat}", "bs=1M", "status=none"], capture_output=True, check=True
            ).stdout
            assert out == img.read_bytes()
            res = subprocess.run(
                ["fincore", "--bytes", "--noheadings", "--output", "RES", str(flat)],
                capture_output=True,
                text=True,
                check=True,
            )
            return int(res.stdout.strip())

        with mounted(repo, tmp_path / "direct", "--direct-io") as mnt:
            assert sweep_and_count(mnt) == 0
            flat = mnt / "web" / ids[1] / "disk0-flat.vmdk"
            fd = os.open(flat, os.O_RDONLY)
            try:  # a private map still works (read-only, copy on write); a shared one does not
                with mmap.mmap(fd, MiB, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ) as m:
                    assert m[: 4 * 4096] == img.read_bytes()[: 4 * 4096]
            finally:
                os.close(fd)
        with mounted(repo, tmp_path / "cached") as mnt:
            assert sweep_and_count(mnt) > 0

    def test_holes_of_a_sparse_disk_read_as_zeros(self, tmp_path: Path, repo: Path) -> None:
        """A 64 GiB sparse disk reads back zeros in its holes and data where it was written."""
        data = os.urandom(70000)
        img = make_image(tmp_path / "big.img", 64 << 30, [((33 << 30) - 1000, data)])
        rp = ingest(repo, "big", f"d={img}")
        with mounted(repo, tmp_path / "mnt") as mnt:
            flat = mnt / "big" / rp / "d-flat.vmdk"
            with open(flat, "rb") as f:
                f.seek(17 << 30)
                assert f.read(MiB) == bytes(MiB)
                f.seek((33 << 30) - 1000)
                assert f.read(70000) == data
            assert flat.stat().st_blocks * 512 <= 3 * DEFAULT_CHUNK  # du: data, not capacity

    def test_config_files_appear(self, tmp_path: Path, repo: Path) -> None:
        """--config files appear by their own names with their content."""
        img = make_image(tmp_path / "d.img", MiB, [(0, b"x")])
        xml = tmp_path / "vm.xml"
        xml.write_text("<domain type='kvm'/>\n")
        rp = ingest(repo, "v", f"d={img}", extra=("--config", str(xml)))
        with mounted(repo, tmp_path / "mnt") as mnt:
            assert sorted(os.listdir(mnt / "v" / rp)) == ["d-flat.vmdk", "d.vmdk", "vm.xml"]
            assert (mnt / "v" / rp / "vm.xml").read_text() == xml.read_text()

    def test_every_directory_lists_dot_and_dotdot(self, tmp_path: Path, repo: Path) -> None:
        """``ls -a`` shows . and .. with the inode numbers of the directory and its parent."""
        img = make_image(tmp_path / "d.img", MiB, [(0, b"x")])
        rp = ingest(repo, "v", f"d={img}")
        with mounted(repo, tmp_path / "mnt") as mnt:
            for d, parent in ((mnt, mnt), (mnt / "v", mnt), (mnt / "v" / rp, mnt / "v")):
                out = subprocess.run(
                    ["ls", "-ai1", str(d)], capture_output=True, text=True, check=True
                ).stdout.split("\n")
                inos = dict(reversed(line.split(maxsplit=1)) for line in out if line.strip())
                assert int(inos["."]) == os.stat(d).st_ino
                if d != mnt:  # the root's .. leaves the mount: stat sees the outer directory
                    assert int(inos[".."]) == os.stat(parent).st_ino
                assert sorted(n for n in inos if n not in (".", "..")) == sorted(os.listdir(d))


class TestReadOnly:
    def test_every_change_fails_with_erofs(
        self, populated: tuple[Path, Path, list[str]], mnt: Path
    ) -> None:
        """write, create, rename, delete, truncate, chmod, mkdir, symlink: EROFS, no change."""
        _repo, img, ids = populated
        d = mnt / "web" / ids[0]
        flat = d / "disk0-flat.vmdk"
        before = _tree_inodes(mnt)
        attempts = [
            lambda: os.open(flat, os.O_WRONLY),
            lambda: os.open(flat, os.O_RDWR),
            lambda: os.open(d / "new", os.O_CREAT | os.O_WRONLY, 0o600),
            lambda: os.rename(flat, d / "moved"),
            lambda: os.unlink(flat),
            lambda: os.truncate(flat, 0),
            lambda: os.chmod(flat, 0o777),
            lambda: os.mkdir(d / "sub"),
            lambda: os.rmdir(d),
            lambda: os.symlink("x", d / "link"),
            lambda: os.utime(flat, (0, 0)),
        ]
        for attempt in attempts:
            with pytest.raises(OSError) as info:
                attempt()
            assert info.value.errno == errno.EROFS, attempt
        assert _tree_inodes(mnt) == before
        qemu_compare(img, img)


class TestStability:
    def test_inodes_and_times_survive_remount(
        self, tmp_path: Path, populated: tuple[Path, Path, list[str]]
    ) -> None:
        """Inode numbers, mtimes and ctimes are identical after unmount and remount."""
        repo, _img, ids = populated
        with mounted(repo, tmp_path / "mnt") as mnt:
            first = _tree_inodes(mnt)
            st = (mnt / "web" / ids[0] / "disk0-flat.vmdk").stat()
            rp = json.loads(repofs("list", repo, "--json").stdout)[0]
            assert (
                st.st_mtime == pytest.approx(rp["created"], abs=1e-6) and st.st_ctime == st.st_mtime
            )
        with mounted(repo, tmp_path / "mnt") as mnt:
            assert _tree_inodes(mnt) == first

    def test_new_restore_point_appears_while_mounted(
        self, populated: tuple[Path, Path, list[str]], mnt: Path
    ) -> None:
        """An ingest during a mount shows up within seconds, and open readers are undisturbed."""
        repo, img, ids = populated
        with open(mnt / "web" / ids[0] / "disk0-flat.vmdk", "rb") as reader:
            head = reader.read(4096)
            new = ingest(repo, "web", f"disk0={img}")
            other = ingest(repo, "db", f"disk0={img}")
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                if new in os.listdir(mnt / "web") and "db" in os.listdir(mnt):
                    break
                time.sleep(0.2)
            assert new in os.listdir(mnt / "web")
            assert other in os.listdir(mnt / "db")
            assert os.readlink(mnt / "web" / "latest") == new
            reader.seek(0)
            assert reader.read(4096) == head
        qemu_compare(img, mnt / "web" / new / "disk0.vmdk")

    @pytest.mark.parametrize(
        ("mount_opts", "tar_opts"),
        [((), ()), (("--direct-io",), ("-b", "2048"))],
        ids=["default", "direct-io-1MiB-records"],
    )
    def test_tar_incremental_sweep_is_clean(
        self,
        tmp_path: Path,
        populated: tuple[Path, Path, list[str]],
        mount_opts: tuple[str, ...],
        tar_opts: tuple[str, ...],
    ) -> None:
        """GNU tar sweeps the mount with --listed-incremental twice without warnings;
        the second level only picks up the new restore point.  Also as the README
        recommends for tape: a --direct-io mount and 1 MiB records."""
        repo, img, _ids = populated
        snar = tmp_path / "sweep.snar"

        def sweep(archive: str, create: str) -> subprocess.CompletedProcess[str]:
            """One level of the sweep into ``archive``; ``create`` is ``-cf`` or ``-cvf``."""
            with mounted(repo, tmp_path / "mnt", *mount_opts) as mnt:
                return subprocess.run(
                    [
                        "tar",
                        "-C",
                        str(mnt),
                        "--listed-incremental",
                        str(snar),
                        "--no-check-device",
                        *tar_opts,
                        create,
                        str(tmp_path / archive),
                        ".",
                    ],
                    capture_output=True,
                    text=True,
                )

        p = sweep("l0.tar", "-cf")
        assert p.returncode == 0 and p.stderr == "", p.stderr
        new = ingest(repo, "web", f"disk0={img}")
        p = sweep("l1.tar", "-cvf")
        assert p.returncode == 0 and "changed as we read" not in p.stderr, p.stderr
        members = [ln for ln in p.stdout.splitlines() if ln.endswith(".vmdk")]
        assert members and all(new in m for m in members), members
        out = tmp_path / "x"
        out.mkdir()
        subprocess.run(["tar", "-C", str(out), "-xf", str(tmp_path / "l0.tar")], check=True)
        qemu_compare(img.with_name("src.img"), out / "web" / _ids[1] / "disk0-flat.vmdk")


class TestDaemonLife:
    def test_killed_daemon_leaves_enotconn_not_an_empty_tree(
        self, tmp_path: Path, populated: tuple[Path, Path, list[str]]
    ) -> None:
        """After kill -9 of the daemon the mount point answers ENOTCONN until unmounted.

        A new mount there is refused with the command that clears the dead
        one, and ``repofs umount`` clears it although its mount point can no
        longer be stat'ed.
        """
        repo, _img, ids = populated
        mnt = tmp_path / "mnt"
        with mounted(repo, mnt):
            for pid in _daemon_pids(mnt):
                os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + 10
            while _daemon_pids(mnt) and time.monotonic() < deadline:
                time.sleep(0.05)
            with pytest.raises(OSError) as info:
                os.listdir(mnt)
            assert info.value.errno in (errno.ENOTCONN, errno.ECONNABORTED)
            assert_one_line_error(
                repofs("mount", repo, mnt, check=False), f"run 'repofs umount {mnt}' first"
            )
            repofs("umount", mnt)
            assert not is_mounted(mnt)
        with mounted(repo, mnt):
            assert sorted(os.listdir(mnt / "web")) == sorted([*ids, "latest"])
        assert not is_mounted(mnt)

    def test_mount_point_errors(self, tmp_path: Path, repo: Path) -> None:
        """A missing mount point, a file, an occupied one: one-line errors."""
        assert_one_line_error(
            repofs("mount", repo, tmp_path / "nope", check=False), "does not exist"
        )
        f = tmp_path / "file"
        f.write_text("")
        assert_one_line_error(repofs("mount", repo, f, check=False), "not a directory")
        with mounted(repo, tmp_path / "mnt") as mnt:
            assert_one_line_error(repofs("mount", repo, mnt, check=False), "already mounted")
        assert_one_line_error(repofs("umount", tmp_path / "mnt", check=False), "not mounted")
        assert_one_line_error(
            repofs("mount", tmp_path / "norepo", tmp_path / "mnt", check=False),
            "no such repository",
        )

    def test_a_user_who_may_not_mount_hears_why(self, tmp_path: Path) -> None:
        """As a user other than root: no access to the FUSE device, or --allow-other
        that /etc/fuse.conf does not allow, is one line that says so.

        libfuse gives its reason only on the daemon's closed stderr.  The child
        drops to ``nobody`` after importing repofs; the device and fuse.conf are
        files of the test's own (their permissions are what is checked), so the
        test does not depend on this machine's /dev/fuse.
        """
        nobody = 65534
        base = Path(tempfile.mkdtemp(prefix="repofs-nobody-"))  # tmp_path is root-only
        try:
            base.chmod(0o755)
            repo, mnt, dev, conf = base / "repo", base / "mnt", base / "fuse", base / "fuse.conf"
            repofs("init", repo)
            mnt.mkdir()
            for p in (repo, *repo.rglob("*"), mnt):
                os.lchown(p, nobody, nobody)
            dev.write_bytes(b"")
            conf.write_text("# user_allow_other\nmount_max = 1000\n")
            script = (
                "import os, sys\n"
                "import repofs.mount.daemon as m\n"
                "from repofs.cli.main import main\n"
                "m.FUSE_DEVICE, m.FUSE_CONF = sys.argv[1], sys.argv[2]\n"
                f"os.setgroups([]); os.setgid({nobody}); os.setuid({nobody})\n"
                "main(sys.argv[3:], prog_name='repofs')\n"
            )

            def mount_as_nobody(*options: str) -> subprocess.CompletedProcess[str]:
                cmd = [sys.executable, "-c", script, str(dev), str(conf)]
                return subprocess.run(
                    [*cmd, "mount", *options, str(repo), str(mnt)],
                    capture_output=True,
                    text=True,
                    timeout=60,
                )

            dev.chmod(0o600)
            assert_one_line_error(mount_as_nobody(), f"{dev}: permission denied")
            dev.chmod(0o666)
            assert_one_line_error(mount_as_nobody("--allow-other"), "user_allow_other")
            assert not is_mounted(mnt)
        finally:
            shutil.rmtree(base)

    def test_umount_command(self, tmp_path: Path, repo: Path) -> None:
        """repofs umount unmounts and the daemon exits."""
        mnt = tmp_path / "mnt"
        mnt.mkdir()
        repofs("mount", repo, mnt)
        try:
            assert is_mounted(mnt)
            repofs("umount", mnt)
            assert not is_mounted(mnt)
            deadline = time.monotonic() + 10
            while _daemon_pids(mnt) and time.monotonic() < deadline:
                time.sleep(0.1)
            assert not _daemon_pids(mnt)
        finally:
            unmount(mnt)

    @pytest.mark.parametrize("size", ["0", "1", "1023K"])
    def test_cache_too_small_to_hold_one_request_is_refused(
        self, tmp_path: Path, repo: Path, size: str
    ) -> None:
        (tmp_path / "mnt").mkdir()
        proc = repofs("mount", repo, tmp_path / "mnt", "--cache-size", size, check=False)
        assert_one_line_error(proc, "--cache-size must be at least 1M")
        assert not is_mounted(tmp_path / "mnt")

    def test_nonempty_mount_point_is_refused_unless_asked(self, tmp_path: Path, repo: Path) -> None:
        """fuse3 mounts over files silently: over another repository's packs/ that made the
        repository look damaged for as long as the mount was up."""
        mnt = tmp_path / "mnt"
        mnt.mkdir()
        (mnt / "keep").write_text("hi")
        assert_one_line_error(
            repofs("mount", repo, mnt, check=False), f"{mnt}: the mount point is not empty"
        )
        assert not is_mounted(mnt)
        repofs("mount", repo, mnt, "--nonempty")
        try:
            assert is_mounted(mnt) and not (mnt / "keep").exists()
        finally:
            unmount(mnt)
        assert (mnt / "keep").read_text() == "hi"

    def test_umount_of_another_users_mount_says_so(
        self, tmp_path: Path, repo: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """fusermount3 told another user the mount was "not found in /etc/mtab".

        The mount is real; only the caller's uid is faked, as this machine's
        interpreter is not reachable for another user.
        """
        from repofs.errors import MountError
        from repofs.mount import daemon as mount_module

        mnt = tmp_path / "mnt"
        mnt.mkdir()
        repofs("mount", repo, mnt)
        try:
            entry = mount_module.top_mount(str(mnt.resolve()))
            assert entry is not None and entry.owner == 0
            monkeypatch.setattr(mount_module.os, "geteuid", lambda: 65534)
            with pytest.raises(MountError, match=r"mounted by another user \(uid 0\)"):
                mount_module.umount(str(mnt))
            monkeypatch.undo()
            assert is_mounted(mnt)
        finally:
            unmount(mnt)

    @pytest.mark.parametrize(
        "name", ["r,allow_other", "rü", "a\\b c"], ids=["comma", "utf8", "backslash-space"]
    )
    def test_repository_path_is_the_source_and_injects_no_option(
        self, tmp_path: Path, repo: Path, name: str
    ) -> None:
        """A comma in the repository's path adds no mount option (allow_other was injected),
        non-ASCII mounts (it killed the daemon), and the source is the exact path."""
        odd = tmp_path / name
        shutil.copytree(repo, odd, symlinks=True)
        with mounted(odd, tmp_path / "mnt") as mnt:
            lines = Path("/proc/self/mountinfo").read_bytes().splitlines()
            fields = next(ln.split() for ln in lines if ln.split()[4] == os.fsencode(str(mnt)))
            after = fields[fields.index(b"-") + 1 :]
            fstype, source, super_options = after[0], after[1], after[2].split(b",")
            assert fstype == b"fuse.repofs"
            assert b"allow_other" not in super_options and b"allow_other" not in fields[5]
            escaped = os.fsencode(f"repofs:{odd}").replace(b"\\", b"\\134").replace(b" ", b"\\040")
            assert source == escaped
            assert os.listdir(mnt) == []

    def test_umount_refuses_what_is_not_a_repofs_mount(self, tmp_path: Path) -> None:
        """A tmpfs with data in it, and /proc, stay mounted: one-line error, non-zero exit.

        As root, fusermount3 -u would unmount anything, so repofs checks the type.
        """
        t = tmp_path / "t"
        t.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(t)], check=True)
        try:
            (t / "keep").write_text("hi")
            assert_one_line_error(repofs("umount", t, check=False), f"{t}: is not a repofs mount")
            assert is_mounted(t) and (t / "keep").read_text() == "hi"
        finally:
            subprocess.run(["umount", str(t)], check=True)
        assert_one_line_error(repofs("umount", "/proc", check=False), "is not a repofs mount")
        assert os.path.exists("/proc/self/mountinfo")

    def test_umount_through_a_symlink_and_of_a_file(self, tmp_path: Path, repo: Path) -> None:
        """A symlink to the mount point unmounts it; a regular file is "not mounted"."""
        mnt, link = tmp_path / "mnt", tmp_path / "mlink"
        mnt.mkdir()
        link.symlink_to("mnt")
        repofs("mount", repo, link)
        try:
            assert is_mounted(mnt)
            repofs("umount", link)
            assert not is_mounted(mnt)
        finally:
            unmount(mnt)
        f = tmp_path / "file"
        f.write_text("")
        assert_one_line_error(repofs("umount", f, check=False), f"{f}: is not mounted")
        assert_one_line_error(
            repofs("umount", tmp_path / "nope", check=False), "no such file or directory"
        )

    def test_mount_point_in_or_above_the_repository_is_refused(
        self, tmp_path: Path, repo: Path
    ) -> None:
        """The repository itself (also through a symlink), a directory in it, or one above it:
        one line, nothing mounted.  Each made the repository unusable while mounted."""
        inside = repo / "packs"
        link = tmp_path / "link"
        link.symlink_to(repo)
        cases = [
            (repo, repo, "the mount point is the repository itself"),
            (repo, link, "the mount point is the repository itself"),
            (link, repo / ".", "the mount point is the repository itself"),
            (repo, inside, "inside the repository"),
            (repo, tmp_path, "would hide the repository"),
        ]
        for src, mnt, words in cases:
            assert_one_line_error(repofs("mount", src, mnt, check=False), words)
            assert not is_mounted(Path(os.path.realpath(mnt)))

    def test_log_file_is_checked_before_the_daemon_starts(self, tmp_path: Path, repo: Path) -> None:
        """--log inside the repository (config.json, or a new file there through a symlink)
        is refused and leaves the repository as it was; an unopenable log file is one line
        naming it, nothing mounted."""
        mnt = tmp_path / "mnt"
        mnt.mkdir()
        config = (repo / "config.json").read_bytes()
        link = tmp_path / "link"
        link.symlink_to(repo)
        for log in (repo / "config.json", link / "new.log"):
            assert_one_line_error(
                repofs("mount", repo, mnt, "--log", log, check=False),
                f"{log}: the log file may not be inside the repository",
            )
        assert (repo / "config.json").read_bytes() == config
        assert not (repo / "new.log").exists()
        cases = (
            (tmp_path / "no" / "dir" / "log", "No such file"),
            (tmp_path, "Is a dir"),
            (Path("/proc/version"), "Invalid argument"),  # opens, but refuses the seek of "a"
        )
        for log, why in cases:
            assert_one_line_error(
                repofs("mount", repo, mnt, "--log", log, check=False),
                f"{log}: cannot open the log file: {why}",
            )
        assert not is_mounted(mnt)
        repofs("list", repo)

    def test_mount_started_with_stdin_and_stdout_closed(self, tmp_path: Path, repo: Path) -> None:
        """The start-up pipe and the log file then get fds 0 and 1, which the daemon points at
        /dev/null: mount returned never (the parent waited on a running daemon), and the log
        would have been lost.  Now it returns, mounted, and the log has its lines."""
        mnt, log = tmp_path / "mnt", tmp_path / "closed.log"
        mnt.mkdir()
        argv = cli_argv("mount", repo, mnt, "--log", log)
        try:
            proc = subprocess.run(
                ["sh", "-c", 'exec "$@" <&- >&-', "sh", *argv], timeout=30, env=cli_env()
            )
            assert proc.returncode == 0 and is_mounted(mnt)
            repofs("umount", mnt)
            deadline = time.monotonic() + 10
            while "unmounted" not in log.read_text() and time.monotonic() < deadline:
                time.sleep(0.1)
            assert "mounted" in log.read_text() and "unmounted" in log.read_text()
        finally:
            unmount(mnt)
