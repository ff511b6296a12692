"""Power loss at every durability point: what was committed survives, nothing half-made shows.

The harness (``tests/support/powerloss.py``, ``tests/support/powerloss_preload.c``) cuts a
real CLI run at a chosen ``fsync`` and builds the tree a power loss then
leaves, in the strict POSIX model.  The default suite cuts each command at a
sample of its points; the slow campaign and ``tools/powerloss`` cut at all.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.support.helpers import REPO_ROOT, cli_env
from tests.support.powerloss import (
    after_power_loss,
    build_library,
    cut_points,
    run,
    run_campaign,
    scenarios,
    snapshot,
    summary,
)

# Durability points, in order: 1 fsync of d1/a, 2 fsync of the root (d1, c, e), 3 fsync of
# d2/b, 4 fsync of d2, 5 fsync of the root again (d2), 6 the O_DSYNC write to f.
MODEL_SCRIPT = textwrap.dedent(
    """
    import os
    def write(path, data, sync=False):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.write(fd, data)
        if sync:
            os.fsync(fd)
        os.close(fd)
    def fsync_dir(path):
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        os.fsync(fd)
        os.close(fd)
    os.mkdir("d1")
    write("d1/a", b"lost: d1 itself is never fsynced", sync=True)
    write("c", b"never fsynced")
    write("e", b"new content, never fsynced")
    fsync_dir(".")
    os.mkdir("d2")
    write("d2/b", b"kept", sync=True)
    fsync_dir("d2")
    fsync_dir(".")
    fd = os.open("f", os.O_WRONLY | os.O_DSYNC)
    os.pwrite(fd, b"XY", 2)
    os.close(fd)
    """
)


def _tree(root: Path) -> dict[str, bytes | None]:
    return {
        str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None)
        for p in sorted(root.rglob("*"))
    }


class TestModel:
    @pytest.fixture
    def setup(self, tmp_path: Path) -> tuple[Path, Path]:
        root = tmp_path / "root"
        root.mkdir()
        (root / "e").write_bytes(b"old content")
        (root / "f").write_bytes(b"abcdef")
        return root, build_library(tmp_path / "lib")

    def _cut(self, tmp_path: Path, root: Path, lib: Path, kill_at: int) -> dict[str, bytes | None]:
        before = snapshot(root)
        done = run(
            [sys.executable, "-c", MODEL_SCRIPT], root, tmp_path / "log", lib, kill_at, cwd=root
        )
        assert done.killed == (kill_at > 0), done.stderr
        after_power_loss(before, done.log, tmp_path / "after")
        return _tree(tmp_path / "after")

    def test_only_what_was_made_durable_survives(
        self, tmp_path: Path, setup: tuple[Path, Path]
    ) -> None:
        """New entries need their directory fsynced, contents their file's; O_DSYNC writes stay."""
        root, lib = setup
        assert self._cut(tmp_path, root, lib, 0) == {
            "c": b"",  # its entry was synced, its content never
            "d1": None,  # d1 was never fsynced: its file is gone
            "d2": None,
            "d2/b": b"kept",
            "e": b"old content",
            "f": b"abXYef",
        }

    def test_a_cut_happens_before_its_point(self, tmp_path: Path, setup: tuple[Path, Path]) -> None:
        """Cut at the second root fsync: d2 and what it holds are not there."""
        root, lib = setup
        assert self._cut(tmp_path, root, lib, 5) == {
            "c": b"",
            "d1": None,
            "e": b"old content",
            "f": b"abcdef",
        }

    def test_sync_makes_everything_durable(self, tmp_path: Path, setup: tuple[Path, Path]) -> None:
        """After sync() the power loss takes nothing: the tree is what the command left."""
        root, lib = setup
        before = snapshot(root)
        script = MODEL_SCRIPT + "os.sync()\n"
        done = run([sys.executable, "-c", script], root, tmp_path / "log", lib, cwd=root)
        assert done.returncode == 0, done.stderr
        after_power_loss(before, done.log, tmp_path / "after")
        assert _tree(tmp_path / "after") == _tree(root)

    def test_samples_keep_the_ends(self) -> None:
        """A sample cuts at the first and last point and lets one run finish."""
        assert cut_points(3, None) == [1, 2, 3, 4]
        sample = cut_points(40, 5)
        assert {1, 40, 41} <= set(sample) and len(sample) <= 7


SCENARIOS = sorted(scenarios())


class TestCampaigns:
    @pytest.mark.parametrize("name", SCENARIOS)
    def test_a_sample_of_cuts(self, tmp_path: Path, name: str) -> None:
        """A few cuts of each command, from the first point to an uncut run, all survive."""
        campaign = run_campaign(scenarios()[name], tmp_path, sample=4)
        assert len(campaign.results) >= 4
        assert not campaign.failures, summary(campaign)

    @pytest.mark.slow
    @pytest.mark.parametrize("name", SCENARIOS)
    def test_every_cut(self, tmp_path: Path, name: str) -> None:
        """A cut at every durability point of each command: committed data survives each one."""
        campaign = run_campaign(scenarios()[name], tmp_path)
        assert len(campaign.results) == campaign.points + 1
        assert not campaign.failures, summary(campaign)


class TestTool:
    def test_the_script_prints_a_summary(self, tmp_path: Path) -> None:
        """tools/powerloss runs a campaign and ends with one line saying how it went."""
        script = REPO_ROOT / "tools" / "powerloss.py"
        proc = subprocess.run(
            [sys.executable, script, "--scenario", "prune", "--sample", "2", "--dir", tmp_path],
            capture_output=True,
            text=True,
            env=cli_env(),
            timeout=600,
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        lines = proc.stdout.splitlines()
        assert lines[0].startswith("prune: ") and "0 failed" in lines[0]
        assert lines[-1] == "power loss: every committed restore point survived every cut"
