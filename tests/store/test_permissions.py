"""Permissions: repository files are the owner's alone; the mount is the mounting user's alone."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from repofs.maintenance.verify.permissions import permission_warnings
from tests.support.helpers import cli_argv, cli_env, make_image, mounted, repofs
from tests.support.maint import MiB, noise

NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


def run_with_umask_0(*args: str | os.PathLike[str]) -> subprocess.CompletedProcess[str]:
    """The CLI under the most permissive umask an administrator could have."""
    cmd = ["sh", "-c", 'umask 000 && exec "$@"', "sh", *cli_argv(*args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=cli_env(), timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc


class TestRepositoryFiles:
    def test_owner_only_under_umask_000(self, tmp_path: Path) -> None:
        """Every directory is 0700 and every file 0600 (packs, LMDB files, config, locks),
        whatever the umask, through init, ingest, prune, gc, rebuild-index and verify."""
        repo = tmp_path / "repo"
        img = make_image(tmp_path / "a.img", 4 * MiB, [(0, noise(2 * MiB, 1))])
        vmx = tmp_path / "a.vmx"
        vmx.write_text("x = 1\n")
        run_with_umask_0("init", repo)
        for _ in range(2):
            run_with_umask_0("ingest", repo, "--vm", "a", f"d0={img}", "--config", vmx)
        run_with_umask_0("prune", repo, "--keep-last", "1")
        run_with_umask_0("gc", repo)
        run_with_umask_0("rebuild-index", repo)
        out = run_with_umask_0("verify", repo).stdout
        assert "warning" not in out
        seen = set()
        for dirpath, dirnames, filenames in os.walk(repo):
            assert stat.S_IMODE(os.stat(dirpath).st_mode) == 0o700, dirpath
            for name in filenames:
                mode = stat.S_IMODE(os.stat(os.path.join(dirpath, name)).st_mode)
                assert mode == 0o600, (dirpath, name, oct(mode))
                seen.add(name if not name.endswith(".pack") else "*.pack")
            del dirnames
        assert {
            "config.json",
            "data.mdb",
            "lock.mdb",
            "lock.gate",
            "lock.main",
            "lock.gc",
            "*.pack",
        } <= seen
        assert permission_warnings(str(repo)) == []

    def test_verify_warns_about_loosened_modes(self, tmp_path: Path) -> None:
        """If someone opens a repository to others, verify says which files (a warning)."""
        repo = tmp_path / "repo"
        repofs("init", repo)
        os.chmod(repo / "index", 0o755)
        out = repofs("verify", repo).stdout
        assert f"warning: {repo / 'index'} is accessible to others" in out


@pytest.fixture
def public_dir() -> Iterator[Path]:
    """A directory that every user can reach (pytest's tmp_path is root-only)."""
    path = Path(tempfile.mkdtemp(prefix="repofs-perm-"))
    os.chmod(path, 0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


class TestMountAccess:
    def test_only_the_mounting_user_unless_allow_other(
        self, tmp_path: Path, public_dir: Path
    ) -> None:
        """Without --allow-other another user gets EACCES; with it, they can list and read."""
        if shutil.which("setpriv") is None:
            raise AssertionError("setpriv is required (util-linux)")
        repo = tmp_path / "repo"
        repofs("init", repo)
        img = make_image(tmp_path / "a.img", MiB, [(0, noise(MiB, 1))])
        repofs("ingest", repo, "--vm", "web", f"d0={img}")
        mnt = public_dir / "mnt"
        with mounted(repo, mnt):
            assert os.listdir(mnt) == ["web"]
            proc = subprocess.run([*NOBODY, "ls", str(mnt)], capture_output=True, text=True)
            assert proc.returncode != 0 and "Permission denied" in proc.stderr, proc
        with mounted(repo, mnt, "--allow-other"):
            proc = subprocess.run([*NOBODY, "ls", str(mnt)], capture_output=True, text=True)
            assert proc.returncode == 0 and proc.stdout.split() == ["web"], proc
            flat = mnt / "web" / "latest" / "d0-flat.vmdk"
            proc = subprocess.run(
                [*NOBODY, "sh", "-c", f"cat {flat} | wc -c"], capture_output=True, text=True
            )
            assert proc.stdout.strip() == str(MiB), proc
