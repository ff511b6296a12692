"""Locking: ingests, verify and gc share the repository, rebuild-index excludes them,
--lock-wait bounds every wait, and kill -9 frees everything."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from repofs.store.lock import repository_lock
from tests.support import maint
from tests.support.helpers import assert_one_line_error, make_image, repofs, spawn
from tests.support.maint import MiB, ingest_here, kill9, new_repo, noise, rp_ids, wait_for_line


class TestSharing:
    def test_two_ingests_at_once_both_succeed(self, tmp_path: Path) -> None:
        """Two ingests (two VMs, and the same VM twice) run together; LMDB serialises commits."""
        repo = new_repo(tmp_path / "repo")
        a = make_image(tmp_path / "a.img", 32 * MiB, [(0, noise(24 * MiB, 1))])
        b = make_image(tmp_path / "b.img", 32 * MiB, [(0, noise(24 * MiB, 2))])
        procs = [
            spawn("ingest", repo, "--vm", vm, f"d0={img}")
            for vm, img in (("a", a), ("b", b), ("b", a))
        ]
        ids = []
        for p in procs:
            out, err = p.communicate(timeout=120)
            assert p.returncode == 0, err
            assert "waiting" not in err  # shared lock: nobody queued
            ids.append(out.strip().splitlines()[-1])
        assert rp_ids(repo, "a") == [ids[0]] and sorted(rp_ids(repo, "b")) == sorted(ids[1:])
        assert ids[1] != ids[2]
        repofs("verify", repo)
        assert maint.read_disk(repo, "b", ids[2]) == a.read_bytes()


class TestExclusion:
    def test_ingest_says_it_waits_for_an_exclusive_holder(self, tmp_path: Path) -> None:
        """While rebuild-index holds the repository, an ingest says it waits, then runs once
        the lock is free."""
        repo = new_repo(tmp_path / "repo")
        img = make_image(tmp_path / "a.img", MiB, [(0, noise(MiB, 1))])
        release = threading.Event()
        held = threading.Event()

        def holder() -> None:
            with repository_lock(str(repo), exclusive=True):
                held.set()
                release.wait(30)

        t = threading.Thread(target=holder)
        t.start()
        held.wait(10)
        try:
            proc = spawn("ingest", repo, "--vm", "a", f"d0={img}")
            wait_for_line(proc, "repofs: waiting: the repository is busy with rebuild-index")
            assert proc.poll() is None
        finally:
            release.set()
            t.join()
        _out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        assert len(rp_ids(repo, "a")) == 1

    def test_rebuild_index_waits_for_gc(self, tmp_path: Path) -> None:
        """gc holds the repository shared to its end, so rebuild-index cannot replace the index
        under it: the rebuild says it waits and runs after gc."""
        repo = new_repo(tmp_path / "repo")
        img = make_image(tmp_path / "a.img", MiB, [(0, noise(MiB, 1))])
        ingest_here(repo, "a", {"d0": img})
        gc = spawn("gc", repo, env={"REPOFS_TEST_GC_DELAY": "1.5"})
        wait_for_line(gc, "gc opened the index")
        time.sleep(2)  # past its first pause: it holds the shared lock now
        rebuild = repofs("rebuild-index", repo, timeout=60)
        assert "repofs: waiting: the repository is in use" in rebuild.stderr
        gc.communicate(timeout=60)
        assert gc.returncode == 0
        repofs("verify", repo)


@contextlib.contextmanager
def held(repo: Path, *, exclusive: bool) -> Iterator[None]:
    """Hold the repository lock in a thread of this process for the duration."""
    release, taken = threading.Event(), threading.Event()

    def holder() -> None:
        with repository_lock(str(repo), exclusive=exclusive):
            taken.set()
            release.wait(60)

    t = threading.Thread(target=holder)
    t.start()
    assert taken.wait(10)
    try:
        yield
    finally:
        release.set()
        t.join()


class TestBackupsNeverWaitForGc:
    def test_new_ingest_runs_beside_gc_and_a_long_shared_holder(self, tmp_path: Path) -> None:
        """Issue 18 item 9: a paused ingest (standing for an hours-long verify or ingest) holds
        the repository shared and gc runs; an ingest started after gc neither waits nor queues
        behind it, and everything verifies afterwards."""
        repo = new_repo(tmp_path / "repo")
        img = make_image(tmp_path / "a.img", 4 * MiB, [(0, noise(4 * MiB, 1))])
        ingest_here(repo, "old", {"d0": img})
        repofs("prune", repo, "--force")  # something for gc to condemn and delete
        long = spawn(
            "ingest",
            repo,
            "--vm",
            "long",
            f"d0={img}",
            env={"REPOFS_TEST_PAUSE_BEFORE_COMMIT": "60"},
        )
        wait_for_line(long, "pausing before commit")
        gc = spawn("gc", repo, env={"REPOFS_TEST_GC_DELAY": "1"})
        time.sleep(3)  # gc holds the repository now (the old gc waited for its sweep then)
        b = make_image(tmp_path / "b.img", 4 * MiB, [(0, noise(4 * MiB, 2))])
        t0 = time.monotonic()
        new = repofs("ingest", repo, "--vm", "new", f"d0={b}", timeout=45)
        assert "waiting" not in new.stderr
        assert time.monotonic() - t0 < 30 and long.poll() is None
        gc_out, gc_err = gc.communicate(timeout=60)
        assert gc.returncode == 0, gc_err
        assert "waiting" not in gc_err, gc_out
        kill9(long)
        rp = new.stdout.strip().splitlines()[-1]
        repofs("verify", repo)
        assert maint.read_disk(repo, "new", rp) == b.read_bytes()


class TestLockWait:
    @pytest.mark.parametrize(
        "command", ["ingest", "prune", "delete", "protect", "gc", "verify", "rebuild-index"]
    )
    def test_gives_up_in_one_line_with_nothing_changed(self, tmp_path: Path, command: str) -> None:
        """--lock-wait SECONDS gives up after SECONDS with one error line, exit 6, and the
        repository as it was; without it the command waits."""
        repo = new_repo(tmp_path / "repo")
        img = make_image(tmp_path / "a.img", MiB, [(0, noise(MiB, 1))])
        rp = ingest_here(repo, "a", {"d0": img})
        args = {
            "ingest": ["--vm", "a", f"d0={img}"],
            "prune": ["--force"],
            "delete": ["a", rp],
            "protect": ["a", "latest"],
            "gc": [],
            "verify": [],
            "rebuild-index": [],
        }[command]
        before = {p: p.stat().st_mtime_ns for p in maint.pack_files(repo)}
        index = (repo / "index" / "data.mdb").read_bytes()
        with held(repo, exclusive=command != "rebuild-index"):
            t0 = time.monotonic()
            proc = repofs(command, repo, *args, "--lock-wait", "0.5", check=False, timeout=30)
            waited = time.monotonic() - t0
        assert proc.returncode == 6, proc.stderr
        assert_one_line_error(proc, "gave up after waiting 0.5 s (--lock-wait)")
        assert "repofs: waiting:" in proc.stderr and 0.5 <= waited < 20
        assert {p: p.stat().st_mtime_ns for p in maint.pack_files(repo)} == before
        assert (repo / "index" / "data.mdb").read_bytes() == index
        assert rp_ids(repo, "a") == [rp]

    def test_a_lock_freed_in_time_is_taken(self, tmp_path: Path) -> None:
        """With --lock-wait, a command whose lock frees before the time is up runs normally."""
        repo = new_repo(tmp_path / "repo")
        img = make_image(tmp_path / "a.img", MiB, [(0, noise(MiB, 1))])
        with held(repo, exclusive=True):
            proc = spawn("ingest", repo, "--vm", "a", f"d0={img}", "--lock-wait", "60")
            wait_for_line(proc, "repofs: waiting:")
        _out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        assert len(rp_ids(repo, "a")) == 1

    def test_bad_value_is_a_usage_error(self, tmp_path: Path) -> None:
        """A negative --lock-wait is refused before anything runs."""
        repo = new_repo(tmp_path / "repo")
        proc = repofs("gc", repo, "--lock-wait", "-1", check=False)
        assert proc.returncode == 2


class TestKilledHolders:
    def test_killed_ingest_leaves_no_lock(self, tmp_path: Path) -> None:
        """kill -9 of an ingest in the middle of its commit: gc and rebuild-index get the
        repository at once (flock dies with its process)."""
        repo = new_repo(tmp_path / "repo")
        img = make_image(tmp_path / "a.img", MiB, [(0, noise(MiB, 1))])
        ingest_here(repo, "a", {"d0": img})
        proc = spawn(
            "ingest", repo, "--vm", "a", f"d0={img}", env={"REPOFS_TEST_PAUSE_BEFORE_COMMIT": "60"}
        )
        wait_for_line(proc, "pausing before commit")
        kill9(proc)
        t0 = time.monotonic()
        for cmd in ("gc", "rebuild-index"):
            out = repofs(cmd, repo, timeout=30)
            assert "waiting" not in out.stderr
        assert time.monotonic() - t0 < 20
        assert len(rp_ids(repo, "a")) == 1

    def test_killed_gc_leaves_no_lock(self, tmp_path: Path) -> None:
        """kill -9 of a gc (its own lock and the shared lock held): the next gc and an ingest
        run without waiting."""
        repo = new_repo(tmp_path / "repo")
        img = make_image(tmp_path / "a.img", 4 * MiB, [(0, noise(4 * MiB, 1))])
        ingest_here(repo, "a", {"d0": img})
        repofs("prune", repo, "--force")
        ingest_here(repo, "b", {"d0": make_image(tmp_path / "b.img", MiB, [(0, b"x")])})
        gc = spawn("gc", repo, env={"REPOFS_TEST_GC_DELAY": "30"})
        time.sleep(1.5)  # inside its first pause, holding lock.gc and the shared lock
        assert gc.poll() is None
        kill9(gc)
        out = repofs("gc", repo, timeout=30)
        assert "waiting" not in out.stderr and "deleted" in out.stdout
        out = repofs("ingest", repo, "--vm", "c", f"d0={img}", timeout=30)
        assert "waiting" not in out.stderr
