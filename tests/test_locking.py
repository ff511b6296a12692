"""Locking: ingests share the repository, gc's sweep and rebuild-index exclude them,
and kill -9 frees everything."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from repofs.lock import repository_lock
from tests.maint_helpers import (
    MiB,
    ingest_here,
    kill9,
    make_image,
    new_repo,
    noise,
    read_disk,
    repofs,
    rp_ids,
    spawn,
    wait_for_line,
)


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
        assert read_disk(repo, "b", ids[2]) == a.read_bytes()


class TestExclusion:
    def test_ingest_says_it_waits_for_an_exclusive_holder(self, tmp_path: Path) -> None:
        """While gc's sweep or rebuild-index holds the repository, an ingest says it waits,
        then runs once the lock is free."""
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
            wait_for_line(proc, "repofs: waiting: the repository is busy with gc or rebuild-index")
            assert proc.poll() is None
        finally:
            release.set()
            t.join()
        _out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        assert len(rp_ids(repo, "a")) == 1

    def test_gc_says_it_waits_for_a_running_ingest(self, tmp_path: Path) -> None:
        """gc's exclusive phase waits for a paused ingest and says so on stderr."""
        repo = new_repo(tmp_path / "repo")
        img = make_image(tmp_path / "a.img", MiB, [(0, noise(MiB, 1))])
        ingest = spawn(
            "ingest", repo, "--vm", "a", f"d0={img}", env={"REPOFS_TEST_PAUSE_BEFORE_COMMIT": "2"}
        )
        wait_for_line(ingest, "pausing before commit")
        gc = repofs("gc", repo)
        assert "repofs: waiting: the repository is in use by an ingest, prune or gc" in gc.stderr
        ingest.communicate(timeout=60)
        assert ingest.returncode == 0
        repofs("verify", repo)


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
