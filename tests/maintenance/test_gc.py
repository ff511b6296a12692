"""gc: mark from live restore points, sweep and compact packs, beside ingests and mounts."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest

from repofs.errors import UsageError
from repofs.maintenance.gc import collect_garbage
from repofs.store.index import rp_key
from repofs.store.repository import Repository
from tests.support import maint
from tests.support.helpers import assert_one_line_error, make_image, mounted, repofs, spawn
from tests.support.maint import (
    MiB,
    chunk_record,
    ingest_here,
    new_repo,
    noise,
    pack_files,
    read_disk,
    rp_ids,
    wait_for_line,
)

PAUSE = {"REPOFS_TEST_PAUSE_BEFORE_COMMIT": "4"}
LONG_PAUSE = {"REPOFS_TEST_PAUSE_BEFORE_COMMIT": "12"}  # gc runs and ends inside it


def packs_bytes(repo: Path) -> int:
    return sum(p.stat().st_size for p in pack_files(repo))


class TestSweep:
    def test_frees_what_prune_released(self, tmp_path: Path) -> None:
        """After prune, gc deletes what only the pruned restore point used; the rest reads back."""
        repo = new_repo(tmp_path / "repo")
        img = make_image(tmp_path / "a.img", 16 * MiB, [(0, noise(12 * MiB, 1))])
        ingest_here(repo, "a", {"d0": img}, now=1_700_000_000)
        make_image(img, 16 * MiB, [(0, noise(2 * MiB, 2))])
        keep = ingest_here(repo, "a", {"d0": img}, now=1_700_000_100)
        expected = read_disk(repo, "a", keep)
        repofs("prune", repo, "--keep-last", "1")
        before = packs_bytes(repo)
        out = repofs("gc", repo).stdout
        after = packs_bytes(repo)
        assert before - after > 11 * MiB, out
        assert "freed 1" in out  # 1x.x MiB
        repofs("verify", repo)
        assert read_disk(repo, "a", keep) == expected

    def test_rewrites_sparse_packs_and_honours_threshold(self, tmp_path: Path) -> None:
        """A pack with a quarter live is rewritten (live records copied, old pack gone)."""
        repo = new_repo(tmp_path / "repo")
        img = make_image(tmp_path / "a.img", 8 * MiB, [(0, noise(4 * MiB, 1))])
        first = ingest_here(repo, "a", {"d0": img}, now=1_700_000_000)
        old_pack, _o, _s = chunk_record(repo, "a", first, 0)
        # the first three quarters change, the last quarter stays as it was
        make_image(img, 8 * MiB, [(0, noise(3 * MiB, 2)), (3 * MiB, noise(4 * MiB, 1)[3 * MiB :])])
        second = ingest_here(repo, "a", {"d0": img}, now=1_700_000_100)
        expected = read_disk(repo, "a", second)
        repofs("prune", repo, "--keep-last", "1")
        dry = collect_garbage(str(repo), threshold=0.0, dry_run=True)
        assert dry.packs_rewritten == 0
        result = collect_garbage(str(repo))
        assert result.packs_rewritten >= 1 and not old_pack.exists()
        assert result.bytes_freed - result.bytes_written > 2 * MiB
        repofs("verify", repo)
        assert read_disk(repo, "a", second) == expected
        with Repository.open(str(repo)) as r:  # the record hint follows a moved record
            rp = r.resolve("a", second)
            assert rp.record is not None
            assert Path(r.packs.path_of(bytes.fromhex(rp.record[0]))).exists()

    def test_dry_run_deletes_nothing(self, tmp_path: Path) -> None:
        """--dry-run reports what it would free and leaves every pack in place."""
        repo = new_repo(tmp_path / "repo")
        img = make_image(tmp_path / "a.img", 4 * MiB, [(0, noise(3 * MiB, 1))])
        ingest_here(repo, "a", {"d0": img})
        repofs("prune", repo, "--force")
        packs = pack_files(repo)
        out = repofs("gc", repo, "--dry-run").stdout
        assert "dry run: would delete" in out
        assert pack_files(repo) == packs

    def test_cleans_leftovers(self, tmp_path: Path) -> None:
        """Unfinished packs, unindexed packs and reservations of dead ingests go away; the
        unfinished pack of a process still running stays."""
        repo = new_repo(tmp_path / "repo")
        img = make_image(tmp_path / "a.img", 4 * MiB, [(0, noise(MiB, 1))])
        rp = ingest_here(repo, "a", {"d0": img})
        child = subprocess.Popen(["true"])
        child.wait()
        (repo / "packs" / "tmp" / f"deadbeef.{child.pid}.tmp").write_bytes(b"x" * 5000)
        running = repo / "packs" / "tmp" / f"cafe.{os.getppid()}.tmp"  # a live writer's
        running.write_bytes(b"y")
        (repo / "packs" / "cd").mkdir(mode=0o700, exist_ok=True)
        stray = repo / "packs" / "cd" / ("cd" * 16 + ".pack")
        shutil.copy(pack_files(repo)[0], stray)
        with Repository.open(str(repo)) as r:
            doc = json.dumps({"seq": 999, "pid": child.pid, "started": 0}).encode()
            key = rp_key("a", "2000-01-01T000000Z")
            r.index.write(lambda t: r.index.put(t, "reservations", key, doc))
        result = collect_garbage(str(repo))
        assert result.orphan_packs == 1 and not stray.exists()
        assert result.tmp_freed == 5000 and os.listdir(repo / "packs" / "tmp") == [running.name]
        assert result.reservations_removed == 1
        running.unlink()
        out = repofs("verify", repo).stdout
        assert "warning" not in out
        assert rp_ids(repo) == [rp]

    def test_refuses_to_sweep_when_referenced_data_is_missing(self, tmp_path: Path) -> None:
        """A live restore point with a lost pack stops gc before it deletes anything."""
        repo = new_repo(tmp_path / "repo")
        img = make_image(tmp_path / "a.img", 4 * MiB, [(0, noise(MiB, 1))])
        rp = ingest_here(repo, "a", {"d0": img})
        pack, _o, _s = chunk_record(repo, "a", rp, 0)
        pack.unlink()
        leftover = repo / "packs" / "tmp" / "x.1.tmp"
        leftover.write_bytes(b"x")
        proc = repofs("gc", repo, check=False)
        assert proc.returncode == 5
        assert_one_line_error(proc, "stopped before deleting anything")
        assert leftover.exists()

    def test_never_deletes_a_pack_the_index_points_into(self, tmp_path: Path) -> None:
        """Even if a pack's own index entry is lost, gc keeps the file while objects use it."""
        repo = new_repo(tmp_path / "repo")
        img = make_image(tmp_path / "a.img", 4 * MiB, [(0, noise(MiB, 1))])
        rp = ingest_here(repo, "a", {"d0": img})
        other = make_image(tmp_path / "b.img", 4 * MiB, [(0, noise(MiB, 2))])
        ingest_here(repo, "b", {"d0": other})  # a pack the index still lists: not an empty index
        pack, _o, _s = chunk_record(repo, "a", rp, 0)
        with Repository.open(str(repo)) as r:
            r.index.write(lambda t: r.index.delete(t, "packs", bytes.fromhex(pack.stem)))
        assert collect_garbage(str(repo)).orphan_packs == 0
        assert pack.exists()
        assert read_disk(repo, "a", rp) == img.read_bytes()
        assert "not in the index's pack list" in repofs("verify", repo, check=False).stdout

    def test_one_gc_at_a_time(self, tmp_path: Path) -> None:
        """A second gc fails at once with a clear message instead of queueing for hours."""
        repo = new_repo(tmp_path / "repo")
        fd = os.open(repo / "lock.gc", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            assert_one_line_error(repofs("gc", repo, check=False), "another gc is running")
        finally:
            os.close(fd)

    def test_bad_threshold(self, tmp_path: Path) -> None:
        """A threshold outside 0..100 is a one-line usage error."""
        repo = new_repo(tmp_path / "repo")
        assert_one_line_error(repofs("gc", repo, "--threshold", "150", check=False), "150")
        assert_one_line_error(repofs("gc", tmp_path / "none", check=False), "no such repository")


class TestUncommittedRecords:
    def test_killed_commit_is_tombstoned_and_never_resurrected(self, tmp_path: Path) -> None:
        """An ingest killed after writing its record but before committing never appears,
        not even after gc and a rebuild from packs that still hold that record."""
        repo = new_repo(tmp_path / "repo")
        img = make_image(tmp_path / "a.img", 4 * MiB, [(0, noise(2 * MiB, 1))])
        good = ingest_here(repo, "a", {"d0": img}, now=1_700_000_000)
        proc = spawn("ingest", repo, "--vm", "a", f"d0={img}", env=PAUSE)
        wait_for_line(proc, "pausing before commit")
        maint.kill9(proc)
        saved = {p: p.read_bytes() for p in pack_files(repo)}
        assert rp_ids(repo) == [good]
        result = collect_garbage(str(repo))
        assert result.tombstones_written == 1
        for p, data in saved.items():  # as if gc had died before deleting the files
            if not p.exists():
                p.write_bytes(data)
                os.chmod(p, 0o600)
        out = repofs("rebuild-index", repo).stdout
        assert "1 pruned one(s) left out" in out
        assert rp_ids(repo) == [good]
        repofs("gc", repo)
        repofs("verify", repo)


class TestRaces:
    def test_gc_beside_a_paused_ingest_reusing_garbage(self, tmp_path: Path) -> None:
        """The ingest reuses chunks that looked dead when gc ran: gc neither waits for it nor
        deletes them; the commit brings them back, and the restore point verifies clean,
        also after a second gc."""
        repo = new_repo(tmp_path / "repo")
        img = make_image(tmp_path / "a.img", 8 * MiB, [(0, noise(6 * MiB, 1))])
        ingest_here(repo, "old", {"d0": img})
        repofs("prune", repo, "--vm", "old", "--force")  # its chunks are garbage now, still indexed
        packs = pack_files(repo)
        ingest = spawn("ingest", repo, "--vm", "new", f"d0={img}", env=LONG_PAUSE)
        wait_for_line(ingest, "pausing before commit")
        out = repofs("gc", repo, timeout=30)
        assert "waiting" not in out.stderr
        assert "0 committed during gc" in out.stdout and "deleted 0 pack(s)" in out.stdout
        assert ingest.poll() is None and set(packs) <= set(pack_files(repo))
        with Repository.open(str(repo)) as r:  # condemned: nothing new deduplicates against it
            assert r.index.read(lambda t: t.stat(r.index.dbs["condemned"])["entries"]) > 0
        i_out, i_err = ingest.communicate(timeout=60)
        assert ingest.returncode == 0, i_err
        rp = i_out.strip().splitlines()[-1]
        repofs("verify", repo)
        assert read_disk(repo, "new", rp) == img.read_bytes()
        repofs("gc", repo)
        repofs("verify", repo)
        assert read_disk(repo, "new", rp) == img.read_bytes()

    def test_cbt_ingest_whose_parent_is_pruned_and_collected_meanwhile(
        self, tmp_path: Path
    ) -> None:
        """A CBT incremental inherits whole map pages of its parent; the parent is pruned and
        gc condemns those pages and chunks while the ingest runs: gc keeps their packs, the
        commit brings them back, and the restore point verifies and reads back, also after
        the next gc (which then deletes nothing of it)."""
        repo = new_repo(tmp_path / "repo")
        size = 256 * MiB  # four map pages of 64 MiB: three are inherited whole
        writes = [(k * 64 * MiB, noise(MiB, 10 + k)) for k in range(4)]
        img = make_image(tmp_path / "a.img", size, writes)
        ingest_here(repo, "vm", {"d0": img}, now=1_700_000_000)
        make_image(img, size, [(0, noise(MiB, 99)), *writes[1:]])
        cbt = tmp_path / "cbt.json"
        cbt.write_text(json.dumps({"block_size": 65536, "extents": [[0, MiB]]}))
        ingest = spawn(
            "ingest",
            repo,
            "--vm",
            "vm",
            f"d0={img}",
            "--changed-blocks",
            f"d0={cbt}",
            env=LONG_PAUSE,
        )
        wait_for_line(ingest, "pausing before commit")
        repofs("prune", repo, "--vm", "vm", "--force")  # the parent goes
        out = repofs("gc", repo, timeout=30).stdout
        assert "that ingests still running may use" in out, out
        i_out, i_err = ingest.communicate(timeout=60)
        assert ingest.returncode == 0, i_err
        rp = i_out.strip().splitlines()[-1]
        expected = img.read_bytes()
        repofs("verify", repo)
        assert read_disk(repo, "vm", rp) == expected
        again = repofs("gc", repo).stdout
        assert "deleted" in again
        repofs("verify", repo)
        assert read_disk(repo, "vm", rp) == expected

    def test_gc_may_condemn_every_pack_while_the_first_ingest_runs(self, tmp_path: Path) -> None:
        """The first ingest of a repository is paused when gc runs: every pack is condemned,
        and the index is still not taken for a lost one; the ingest commits clean."""
        repo = new_repo(tmp_path / "repo")
        img = make_image(tmp_path / "a.img", 4 * MiB, [(0, noise(4 * MiB, 1))])
        ingest = spawn("ingest", repo, "--vm", "a", f"d0={img}", env=LONG_PAUSE)
        wait_for_line(ingest, "pausing before commit")
        repofs("gc", repo, timeout=30)
        with Repository.open(str(repo)) as r:
            assert r.index.read(lambda t: t.stat(r.index.dbs["packs"])["entries"]) == 0
        assert repofs("list", repo).returncode == 0
        i_out, i_err = ingest.communicate(timeout=60)
        assert ingest.returncode == 0, i_err
        repofs("verify", repo)
        assert read_disk(repo, "a", i_out.strip().splitlines()[-1]) == img.read_bytes()

    def test_reservation_refuses_a_parent_pruned_before_it(self, tmp_path: Path) -> None:
        """The parent is checked in the reservation's own transaction: from then on a gc that
        condemns its pages has a newer generation, which the commit sees; a parent pruned
        before that is refused, and nothing is reserved."""
        repo = new_repo(tmp_path / "repo")
        img = make_image(tmp_path / "a.img", MiB, [(0, noise(MiB, 1))])
        parent = ingest_here(repo, "vm", {"d0": img})
        repofs("prune", repo, "--force")
        with Repository.open(str(repo)) as r:
            with pytest.raises(UsageError, match="was pruned while this ingest started"):
                r.reserve("vm", parent=parent)
            assert r.index.read(lambda t: t.stat(r.index.dbs["reservations"])["entries"]) == 0

    @pytest.mark.slow
    def test_gc_beside_running_ingests_of_a_sparse_image(self, tmp_path: Path) -> None:
        """Ingests of a large sparse image (half of it garbage the ingest will reuse,
        half new) run while gc runs, started before and after it; gc condemns what the ingest
        reuses and the commit brings it back: every restore point verifies and reads back,
        also after the next gc.  gc is slowed down so that the runs overlap for sure."""
        repo = new_repo(tmp_path / "repo")
        writes = [(k * 32 * MiB, noise(4 * MiB, k)) for k in range(32)]
        img = make_image(tmp_path / "big.img", 1024 * MiB, writes)
        overlapped = 0
        for round_, gc_first in enumerate((False, True)):
            ingest_here(repo, "seed", {"d0": img})
            repofs("prune", repo, "--force")  # all of it is garbage the ingest can reuse
            for k in range(0, len(writes), 2):  # and half of the image changes
                writes[k] = (writes[k][0], noise(4 * MiB, 1000 * (round_ + 1) + k))
            make_image(img, 1024 * MiB, writes)
            slow_gc = {"REPOFS_TEST_GC_DELAY": "0.15"}
            # On an idle machine the ingest could commit before gc condemns anything: a
            # pause between its last lookup and its commit makes the overlap certain.
            paused = {"REPOFS_TEST_PAUSE_BEFORE_COMMIT": "1"}
            if gc_first:
                gc = spawn("gc", repo, env=slow_gc)
                time.sleep(0.1)
                ingest = spawn("ingest", repo, "--vm", "vm", f"d0={img}", env=paused)
            else:
                ingest = spawn("ingest", repo, "--vm", "vm", f"d0={img}", env=paused)
                time.sleep(0.15)
                gc = spawn("gc", repo, env=slow_gc)
            gc_out, gc_err = gc.communicate(timeout=300)
            out, err = ingest.communicate(timeout=300)
            assert ingest.returncode == 0 and gc.returncode == 0, err + gc_err
            overlapped += "(1 committed during gc)" in gc_out or "that ingests still" in gc_out
            rp = out.strip().splitlines()[-1]
            for _ in range(2):  # and after the gc that deletes what it held back
                repofs("verify", repo, "--vm", "vm")
                for offset, data in writes:
                    got = maint.read_range(repo, "vm", rp, offset - 4096, len(data) + 8192)
                    assert got == (bytes(4096) if offset else b"") + data + bytes(4096)
                repofs("gc", repo)
        assert overlapped, "gc never ran beside the ingest; the test proved nothing"

    def test_reader_of_a_pruned_restore_point_gets_bytes_or_eio(self, tmp_path: Path) -> None:
        """A reader keeps reading a restore point while prune and gc remove it: every read
        returns the ingested bytes or EIO, never other bytes."""
        repo = new_repo(tmp_path / "repo")
        img = make_image(tmp_path / "a.img", 32 * MiB, [(0, noise(32 * MiB, 1))])
        old = ingest_here(repo, "a", {"d0": img}, now=1_700_000_000)
        expected = img.read_bytes()
        make_image(img, 32 * MiB, [(0, noise(32 * MiB, 2))])
        ingest_here(repo, "a", {"d0": img}, now=1_700_000_100)
        outcomes = {"ok": 0, "eio": 0}
        bad: list[tuple[int, str]] = []
        stop = threading.Event()
        with mounted(repo, tmp_path / "mnt", "--cache-size", "1M") as mnt:
            flat = mnt / "a" / old / "d0-flat.vmdk"
            fd = os.open(flat, os.O_RDONLY)

            def reader() -> None:
                step = 128 * 1024
                offsets = list(range(0, 32 * MiB, step))
                while not stop.is_set():
                    for off in offsets:
                        try:
                            data = os.pread(fd, step, off)
                        except OSError as exc:
                            if exc.errno != errno.EIO:
                                bad.append((off, f"errno {exc.errno}"))
                            outcomes["eio"] += 1
                            continue
                        # A short read is fine (the kernel returns what it got before an
                        # error), as long as every byte it returns is the ingested byte.
                        if not data or data != expected[off : off + len(data)]:
                            bad.append((off, f"{len(data)} bytes, differ"))
                        outcomes["ok"] += 1
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # drop the page cache

            thread = threading.Thread(target=reader)
            thread.start()
            try:
                time.sleep(0.3)
                repofs("prune", repo, "--keep-last", "1")
                repofs("gc", repo)
                time.sleep(0.5)
            finally:
                stop.set()
                thread.join()
                os.close(fd)
        assert not bad, f"wrong bytes at offsets {bad[:5]}"
        assert outcomes["ok"] > 0
        repofs("verify", repo)
