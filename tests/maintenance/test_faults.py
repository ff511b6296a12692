"""Faults, each automated: kill -9 anywhere, a full disk, damaged packs and index, a full LMDB map.

The long ones are marked ``slow``; they are never skipped.  After every
fault the same promises are checked: verify passes (or names exactly what
was damaged), nothing half-made is listed or mounted, what was committed
before reads back identical, and the next operation succeeds.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from repofs.errors import IntegrityError, NoSpaceError
from repofs.maintenance import prune as prune_module
from repofs.maintenance.gc import collect_garbage
from repofs.maintenance.rebuild import rebuild_index
from repofs.maintenance.verify.checks import verify_repository
from repofs.store.index import Index
from repofs.store.records import RECORD_HEADER_SIZE, RecordType
from repofs.store.repository import Repository
from repofs.store.reserve import set_aside
from tests.support.helpers import (
    assert_one_line_error,
    cli_env,
    make_image,
    mounted,
    qemu_compare,
    repofs,
    spawn,
)
from tests.support.maint import (
    MiB,
    chunk_record,
    flip_byte,
    ingest_here,
    kill9,
    new_repo,
    noise,
    pack_files,
    read_disk,
    read_range,
    rp_ids,
    wait_for_line,
)

CS = 64 * 1024


def random_file(path: Path, size: int) -> Path:
    with open(path, "wb") as f:
        for _ in range(size // MiB):
            f.write(os.urandom(MiB))
    return path


def restamp(path: Path, tag: int) -> None:
    """Make every chunk of an image new (16 bytes at each chunk start) without rewriting it."""
    size = path.stat().st_size
    stamp = tag.to_bytes(8, "little")
    with open(path, "r+b") as f:
        for k, off in enumerate(range(0, size, CS)):
            f.seek(off)
            f.write(stamp + k.to_bytes(8, "little"))


def assert_healthy(repo: Path, committed: dict[str, bytes], vm: str = "vm") -> None:
    """verify passes and exactly the committed restore points exist, with their content."""
    result = verify_repository(str(repo))
    assert result.ok, [f"{p.subject}: {p.message}" for p in result.problems]
    assert rp_ids(repo, vm) == sorted(committed)
    for rp, digest in committed.items():
        assert digest_of_disk(repo, vm, rp) == digest


def digest_of_disk(repo: Path, vm: str, rp: str) -> bytes:
    return hashlib.sha256(read_disk(repo, vm, rp)).digest()


def ingest_committed(repo: Path, img: Path) -> dict[str, bytes]:
    """Ingest ``img`` as VM vm: {id: digest}, to check it survives what follows."""
    rp = repofs("ingest", repo, "--vm", "vm", f"d0={img}").stdout.split()[-1]
    return {rp: digest_of_disk(repo, "vm", rp)}


class TestMountEIO:
    def test_flipped_byte_gives_eio_for_its_range_only_and_is_logged(self, tmp_path: Path) -> None:
        """dd of the damaged chunk fails with EIO, other ranges read fine, and the daemon log
        names the VM, restore point, disk and byte range."""
        repo = new_repo(tmp_path / "repo")
        data = noise(8 * MiB, 3)
        img = make_image(tmp_path / "a.img", 8 * MiB, [(0, data)])
        rp = ingest_here(repo, "web", {"d0": img})
        pack, offset, _s = chunk_record(repo, "web", rp, 3 * MiB)
        flip_byte(pack, offset + RECORD_HEADER_SIZE + 1000)
        with mounted(repo, tmp_path / "mnt") as mnt:
            flat = mnt / "web" / rp / "d0-flat.vmdk"
            bad = subprocess.run(
                ["dd", f"if={flat}", "of=/dev/null", "bs=64K", "skip=48", "count=1"],
                capture_output=True,
                text=True,
            )
            assert bad.returncode != 0 and "Input/output error" in bad.stderr
            good = subprocess.run(
                ["dd", f"if={flat}", "bs=64K", "skip=0", "count=16"], capture_output=True
            )
            assert good.returncode == 0 and good.stdout == data[:MiB]
            tail = subprocess.run(
                ["dd", f"if={flat}", "bs=64K", "skip=64", "count=64"], capture_output=True
            )
            assert tail.returncode == 0 and tail.stdout == data[4 * MiB :]
        log = (tmp_path / "mnt.log").read_text()
        assert f"I/O error reading web/{rp}/d0-flat.vmdk bytes {3 * MiB}-" in log


@pytest.mark.slow
class TestKills:
    def test_kill_ingest_at_random_moments_and_during_commit(self, tmp_path: Path) -> None:
        """SIGKILL of a 200 MiB ingest at 20 random moments and 5 times in its commit: no
        partial restore point is ever listed or mounted, earlier ones stay intact, verify
        passes, and the next ingest succeeds."""
        repo = new_repo(tmp_path / "repo")
        base = make_image(tmp_path / "base.img", 8 * MiB, [(0, noise(4 * MiB, 1))])
        first = ingest_here(repo, "vm", {"d0": base})
        committed = {first: digest_of_disk(repo, "vm", first)}
        big = random_file(tmp_path / "big.img", 200 * MiB)
        scratch = new_repo(tmp_path / "scratch")
        t0 = time.monotonic()
        repofs("ingest", scratch, "--vm", "x", f"d0={big}")
        duration = time.monotonic() - t0
        shutil.rmtree(scratch)
        rng = random.Random(20261124)
        for attempt in range(20):
            restamp(big, attempt + 1)
            proc = spawn("ingest", repo, "--vm", "vm", f"d0={big}")
            time.sleep(rng.uniform(0, duration * 0.9))  # the commit itself has its own kills
            kill9(proc)
            new = sorted(set(rp_ids(repo, "vm")) - set(committed))
            assert len(new) <= 1 and set(committed) <= set(rp_ids(repo, "vm")), attempt
            if new:  # killed after its commit (or it finished): then it must be whole
                digest = digest_of_disk(repo, "vm", new[0])
                assert digest == hashlib.sha256(big.read_bytes()).digest(), attempt
                committed[new[0]] = digest
            if attempt % 7 == 6:
                collect_garbage(str(repo))
        small = make_image(tmp_path / "small.img", 4 * MiB, [(0, noise(MiB, 2))])
        for attempt in range(5):
            restamp(small, 100 + attempt)
            proc = spawn(
                "ingest",
                repo,
                "--vm",
                "vm",
                f"d0={small}",
                env={"REPOFS_TEST_PAUSE_BEFORE_COMMIT": "60"},
            )
            wait_for_line(proc, "pausing before commit")
            kill9(proc)
            assert rp_ids(repo, "vm") == sorted(committed)
        assert_healthy(repo, committed)
        with mounted(repo, tmp_path / "mnt") as mnt:
            listed = sorted(p.name for p in (mnt / "vm").iterdir())
            assert listed == sorted([*committed, "latest"])
            qemu_compare(base, mnt / "vm" / first / "d0.vmdk")
        restamp(small, 999)
        last = repofs("ingest", repo, "--vm", "vm", f"d0={small}").stdout.strip().splitlines()[-1]
        committed[last] = digest_of_disk(repo, "vm", last)
        out = repofs("gc", repo).stdout
        assert "5 stale reservation(s)" in out or "stale reservation" in out
        assert_healthy(repo, committed)
        rebuild_index(str(repo))
        assert_healthy(repo, committed)

    def test_kill_gc_at_random_moments(self, tmp_path: Path) -> None:
        """SIGKILL of gc (slowed down so kills land in every phase) at random moments: verify
        passes after each, the kept restore points read back identical, nothing pruned comes
        back after a rebuild, and the next gc finishes the job."""
        template = new_repo(tmp_path / "template")
        img = make_image(tmp_path / "a.img", 12 * MiB, [(0, noise(12 * MiB, 1))])
        for k in range(4):
            with open(img, "r+b") as f:
                f.seek(k * 3 * MiB)
                f.write(noise(3 * MiB, 10 + k))
            ingest_here(template, "vm", {"d0": img}, now=1_700_000_000 + k * 100)
        ingest_here(template, "vm", {"d0": img}, now=1_700_001_000)  # only a new record
        repofs("prune", template, "--keep-last", "2")
        committed = {rp: digest_of_disk(template, "vm", rp) for rp in rp_ids(template, "vm")}
        env = {"REPOFS_TEST_GC_DELAY": "0.05"}
        probe = tmp_path / "probe"
        shutil.copytree(template, probe)
        t0 = time.monotonic()
        out = repofs("gc", probe, env=env).stdout
        duration = time.monotonic() - t0
        assert "rewrote" in out and "deleted" in out
        shutil.rmtree(probe)
        rng = random.Random(4242)
        template_packs = {p.name for p in template.glob("packs/??/*.pack")}
        phases: set[str] = set()
        for attempt in range(14):
            work = tmp_path / f"w{attempt}"
            shutil.copytree(template, work)
            proc = spawn("gc", work, env=env)
            time.sleep(rng.uniform(0, duration))
            kill9(proc)
            packs = {p.name for p in work.glob("packs/??/*.pack")}
            phases.add(
                "untouched"
                if packs == template_packs
                else "done"
                if proc.returncode == 0
                else "partial"
            )
            assert_healthy(work, committed)
            if attempt % 3 == 0:
                rebuild_index(str(work))
                assert_healthy(work, committed)
            collect_garbage(str(work))
            assert_healthy(work, committed)
            again = collect_garbage(str(work))  # the job is finished: nothing left to do
            assert (again.packs_deleted, again.packs_rewritten, again.orphan_packs) == (0, 0, 0)
            shutil.rmtree(work)
        assert "partial" in phases


# Runs the CLI with SIGKILL at one exact moment: the first time a restore point record is
# indexed (REPOFS_KILL_AT=index-rp), or at the Nth pack deletion (REPOFS_KILL_AT=delete:N).
# REPOFS_KILL_AT=stop-then-index-rp also stops itself (SIGSTOP) once its first pack is indexed.
KILL_AT_SCRIPT = """
import os, signal, sys
from repofs.store.index import Index
from repofs.store.packstore import LocalPackStore
from repofs.store.records import RecordType
from repofs.store.writer import ObjectWriter
where, _, n = os.environ["REPOFS_KILL_AT"].partition(":")
add_pack, delete, deletes = Index.add_pack, LocalPackStore.delete, [0]
publish, published = ObjectWriter._publish, [0]
def killing_add_pack(self, txn, pack_id, size, entries):
    if where.endswith("index-rp") and any(e[0] == RecordType.RESTORE_POINT for e in entries):
        os.kill(os.getpid(), signal.SIGKILL)
    return add_pack(self, txn, pack_id, size, entries)
def stopping_publish(self, sink, entries):
    pack_id = publish(self, sink, entries)  # published and indexed: no transaction is open
    published[0] += 1
    if where == "stop-then-index-rp" and published[0] == 1:
        os.kill(os.getpid(), signal.SIGSTOP)
    return pack_id
ObjectWriter._publish = stopping_publish
def killing_delete(self, pack_id):
    deletes[0] += 1
    if where == "delete" and deletes[0] == int(n):
        os.kill(os.getpid(), signal.SIGKILL)
    return delete(self, pack_id)
Index.add_pack, LocalPackStore.delete = killing_add_pack, killing_delete
from repofs.cli.main import main
sys.argv[0] = "repofs"
main()
"""


def killed_at(where: str, tmp_path: Path, *args: str | Path) -> None:
    """Run the CLI with ``args`` and SIGKILL it at ``where`` (see KILL_AT_SCRIPT); it must die."""
    script = tmp_path / "kill_at.py"
    script.write_text(KILL_AT_SCRIPT)
    proc = subprocess.run(
        [sys.executable, str(script), *map(str, args)],
        env=cli_env({"REPOFS_KILL_AT": where}),
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, proc.stderr[-2000:])


class TestKilledLastPack:
    """An ingest killed between publishing the pack with its restore point record and indexing
    it leaves that record in a pack the index does not know; only the ingest's reservation
    tells it from a committed restore point that the index lost."""

    @pytest.mark.parametrize("gc_kill", [None, 1, 2])  # its leftover pack, the doomed one
    def test_gc_collects_it_even_when_killed_itself(
        self, tmp_path: Path, gc_kill: int | None
    ) -> None:
        """gc, also after being killed at any of its pack deletions, collects the killed
        ingest's record: the next gc neither refuses nor leaves anything, and no rebuild
        brings the failed restore point back."""
        repo = new_repo(tmp_path / "repo")
        img = make_image(tmp_path / "a.img", 4 * MiB, [(0, noise(4 * MiB, 1))])
        ingest_here(repo, "vm", {"d0": img}, now=1_700_000_000)
        img2 = make_image(tmp_path / "b.img", 4 * MiB, [(0, noise(4 * MiB, 2))])
        kept = ingest_here(repo, "vm", {"d0": img2}, now=1_700_000_100)
        repofs("prune", repo, "--keep-last", "1")  # the first one's pack is now doomed
        img3 = make_image(tmp_path / "c.img", 4 * MiB, [(0, noise(4 * MiB, 3))])
        killed_at("index-rp", tmp_path, "ingest", repo, "--vm", "vm", f"d0={img3}")
        committed = {kept: digest_of_disk(repo, "vm", kept)}
        assert rp_ids(repo, "vm") == [kept]
        if gc_kill is not None:
            killed_at(f"delete:{gc_kill}", tmp_path, "gc", repo)
            assert_healthy(repo, committed)
        result = collect_garbage(str(repo))
        assert result.warnings == []
        assert_healthy(repo, committed)
        again = collect_garbage(str(repo))
        assert (again.packs_deleted, again.packs_rewritten, again.orphan_packs) == (0, 0, 0)
        rebuild_index(str(repo))
        assert_healthy(repo, committed)

    def test_an_ingest_that_cannot_index_its_last_pack_deletes_it(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """An ingest whose last index write fails (a disk that filled up) fails in one line,
        takes back the pack it published, and gc afterwards runs without asking for a
        rebuild-index."""
        repo = new_repo(tmp_path / "repo")
        img = make_image(tmp_path / "a.img", 4 * MiB, [(0, noise(4 * MiB, 1))])
        first = ingest_here(repo, "vm", {"d0": img})
        committed = {first: digest_of_disk(repo, "vm", first)}
        packs_before = set(pack_files(repo))
        add_pack = Index.add_pack

        def full_at_the_record(
            self: Index,
            txn: object,
            pack_id: bytes,
            size: int,
            entries: list[tuple[RecordType, bytes, int, int, int]],
        ) -> None:
            if any(e[0] == RecordType.RESTORE_POINT for e in entries):
                raise NoSpaceError("no space left on device (test)")
            add_pack(self, txn, pack_id, size, entries)

        monkeypatch.setattr(Index, "add_pack", full_at_the_record)
        img2 = make_image(tmp_path / "b.img", 4 * MiB, [(0, noise(4 * MiB, 2))])
        with pytest.raises(NoSpaceError):
            ingest_here(repo, "vm", {"d0": img2})
        monkeypatch.undo()
        new_packs = set(pack_files(repo)) - packs_before
        with Repository.open(str(repo)) as r:
            indexed = r.index.read(lambda t: {k for k, _ in r.index.items(t, "packs")})
        assert all(bytes.fromhex(p.stem) in indexed for p in new_packs)  # the record's is gone
        assert rp_ids(repo, "vm") == [first]
        result = collect_garbage(str(repo))
        assert result.warnings == []
        assert_healthy(repo, committed)


def compact_index(repo: Path) -> None:
    """Rewrite the index without free pages, so that its next write needs new blocks.

    LMDB reuses the pages earlier transactions freed: on a full disk a
    command then succeeds or fails by how many a previous command happened
    to leave, and the tests that need the disk to refuse an index write
    depended on that luck.
    """
    import lmdb

    index, copy = repo / "index", repo / "index.compact"
    copy.mkdir()
    env = lmdb.open(str(index), max_dbs=16, readonly=True, lock=False)
    try:
        env.copy(str(copy), compact=True)
    finally:
        env.close()
    os.replace(copy / "data.mdb", index / "data.mdb")
    copy.rmdir()


def fill_up(path: Path) -> None:
    """Fill the file system with one file; dd, because root may also write ext4's reserved
    blocks that statvfs hides.  Then the last blocks, 1 KiB at a time: 64 KiB writes
    left up to 63 KiB free, which let an index write through or not by how many pages
    it needed (the same prune passed unencrypted and failed encrypted)."""
    subprocess.run(["dd", "if=/dev/zero", f"of={path}", "bs=64k"], capture_output=True)
    subprocess.run(
        ["dd", "if=/dev/zero", f"of={path}", "bs=1k", "oflag=append", "conv=notrunc"],
        capture_output=True,
    )


@contextlib.contextmanager
def small_filesystem(tmp_path: Path, size_mib: int = 64) -> Iterator[Path]:
    """A fresh ext4 filesystem on a loop device, always unmounted afterwards."""
    image = tmp_path / "fs.img"
    mnt = tmp_path / "fs"
    mnt.mkdir()
    with open(image, "wb") as f:
        f.truncate(size_mib * MiB)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True)
    subprocess.run(["mount", "-o", "loop", str(image), str(mnt)], check=True)
    try:
        yield mnt
    finally:
        for _ in range(20):
            if subprocess.run(["umount", str(mnt)], capture_output=True).returncode == 0:
                break
            time.sleep(0.2)


class TestSignals:
    def test_sigterm_after_the_commit_is_success(self, tmp_path: Path) -> None:
        """A SIGTERM just after the commit made ingest exit 143 with its restore point
        stored and its id printed: a wrapper would retry, for a duplicate.  From the
        commit on the command's status is the commit's."""
        repo = new_repo(tmp_path / "repo")
        img = make_image(tmp_path / "a.img", 4 * MiB, [(0, noise(4 * MiB, 6))])
        proc = spawn("ingest", repo, "--vm", "vm", f"d0={img}")
        assert proc.stdout is not None
        while "committed" not in (line := proc.stdout.readline()):  # the summary, then the id
            assert line, "ingest ended before its summary"
        proc.send_signal(signal.SIGTERM)
        with proc.stdout, proc.stderr:  # type: ignore[union-attr]
            out = proc.stdout.read()  # communicate() would skip what readline() buffered
            assert proc.wait(timeout=60) == 0, proc.stderr.read()  # type: ignore[union-attr]
        assert rp_ids(repo, "vm") == [out.split()[-1]]

    @pytest.mark.parametrize(
        ("sig", "code", "word"),
        [
            (signal.SIGINT, 130, "interrupted"),
            (signal.SIGTERM, 143, "terminated"),
        ],
    )
    def test_ctrl_c_and_sigterm_clean_up_an_ingest(
        self, tmp_path: Path, sig: signal.Signals, code: int, word: str
    ) -> None:
        """Ctrl-C, or SIGTERM from a scheduler or systemd, in the middle of the commit: one
        line, its own exit status, no restore point, no unpublished pack left behind, and
        the next ingest works."""
        repo = new_repo(tmp_path / "repo")
        img = make_image(tmp_path / "a.img", 4 * MiB, [(0, noise(4 * MiB, 5))])
        first = ingest_here(repo, "vm", {"d0": img})
        committed = {first: digest_of_disk(repo, "vm", first)}
        restamp(img, 1)
        proc = spawn(
            "ingest",
            repo,
            "--vm",
            "vm",
            f"d0={img}",
            env={"REPOFS_TEST_PAUSE_BEFORE_COMMIT": "60"},
        )
        wait_for_line(proc, "pausing before commit")
        proc.send_signal(sig)
        _out, err = proc.communicate(timeout=60)
        assert proc.returncode == code, err
        assert err.splitlines() == [f"repofs: error: {word}"], err  # no blank line before it
        assert not list((repo / "packs" / "tmp").iterdir())
        assert_healthy(repo, committed)
        # Its record was published before the stop, and is tombstoned: a rebuild before any
        # gc brought back a restore point whose ingest had said "terminated".
        repofs("rebuild-index", repo)
        assert rp_ids(repo, "vm") == [first]
        again = repofs("ingest", repo, "--vm", "vm", f"d0={img}").stdout.split()[-1]
        assert rp_ids(repo, "vm") == sorted([first, again])


def free_bytes(path: Path, root: bool = False) -> int:
    """Free space for ordinary users, or (``root``) counting ext4's blocks reserved for root."""
    st = os.statvfs(path)
    return (st.f_bfree if root else st.f_bavail) * st.f_frsize


@pytest.mark.slow
class TestFullDisk:
    def test_full_disk_during_ingest(self, tmp_path: Path) -> None:
        """An ingest larger than the filesystem fails with one line and exit 8; what was
        committed is unharmed, gc gives the space back, and the next ingest works."""
        with small_filesystem(tmp_path) as fs:
            repo = fs / "repo"
            repofs("init", repo)
            small = make_image(tmp_path / "small.img", 4 * MiB, [(0, noise(2 * MiB, 1))])
            committed = ingest_committed(repo, small)
            free_before = free_bytes(fs)
            packs_before = set(pack_files(repo))
            big = random_file(tmp_path / "big.img", 100 * MiB)
            proc = repofs("ingest", repo, "--vm", "vm", f"d0={big}", check=False)
            assert proc.returncode == 8, proc.stderr
            assert_one_line_error(proc, "no space left")
            # The packs the failed ingest published stay for gc, each indexed: one whose
            # indexing the full disk stopped was deleted at once.
            left = set(pack_files(repo)) - packs_before
            with Repository.open(str(repo)) as r:
                indexed = r.index.read(lambda t: {k for k, _ in r.index.items(t, "packs")})
            assert all(bytes.fromhex(p.stem) in indexed for p in left)
            assert free_bytes(fs) < free_before - sum(p.stat().st_size for p in left) + MiB
            assert_healthy(repo, committed)
            repofs("gc", repo)
            assert free_bytes(fs) > free_before - 2 * MiB
            assert_healthy(repo, committed)
            small2 = make_image(tmp_path / "small2.img", 4 * MiB, [(0, noise(2 * MiB, 2))])
            second = repofs("ingest", repo, "--vm", "vm", f"d0={small2}").stdout.split()[-1]
            committed[second] = digest_of_disk(repo, "vm", second)
            assert_healthy(repo, committed)

    def test_full_disk_during_gc(self, tmp_path: Path) -> None:
        """gc that cannot write its rewritten pack stops rewriting with a warning, keeps
        every committed byte, claims no bytes it did not write, and finishes the job once
        there is room again."""
        with small_filesystem(tmp_path) as fs:
            repo = fs / "repo"
            repofs("init", repo)
            old = noise(24 * MiB, 7)
            first = make_image(tmp_path / "a.img", 24 * MiB, [(0, old)])
            repofs("ingest", repo, "--vm", "vm", f"d0={first}")
            # The next keeps a third of the first's pack alive: gc must rewrite, not delete it.
            keep = make_image(tmp_path / "b.img", 24 * MiB, [(0, old[: 8 * MiB])])
            with open(keep, "r+b") as f:
                f.seek(8 * MiB)
                f.write(noise(16 * MiB, 8))
            second = repofs("ingest", repo, "--vm", "vm", f"d0={keep}").stdout.split()[-1]
            repofs("prune", repo, "--keep-last", "1")
            committed = {second: digest_of_disk(repo, "vm", second)}
            filler = fs / "filler"
            subprocess.run(["fallocate", "-l", str(free_bytes(fs) - MiB), str(filler)], check=True)
            proc = repofs("gc", repo)
            assert "warning: stopped rewriting packs" in proc.stdout, proc.stdout
            assert "no space left" in proc.stdout and "Traceback" not in proc.stderr
            assert "rewrote 0" in proc.stdout and "0 B rewritten" in proc.stdout, proc.stdout
            assert_healthy(repo, committed)
            filler.unlink()
            free_before = free_bytes(fs)
            proc = repofs("gc", repo)
            assert "rewrote 1" in proc.stdout, proc.stdout
            assert free_bytes(fs) > free_before + 14 * MiB
            assert_healthy(repo, committed)

    def test_prune_and_gc_on_a_filesystem_without_a_free_byte(self, tmp_path: Path) -> None:
        """With not one byte free (and an index without freed pages to reuse), prune gives
        up the repository's reserve and works; gc does the same to commit its sweep, frees
        what prune released and sets the reserve aside again.  Without a reserve gc stops
        with one line and exit 8, harming nothing."""
        with small_filesystem(tmp_path) as fs:
            repo = fs / "repo"
            repofs("init", repo)
            reserve = repo / "reserve"
            assert reserve.stat().st_size >= 512 * 1024  # 1 % of this 64 MiB file system
            assert stat.S_IMODE(reserve.stat().st_mode) == 0o600
            old = noise(24 * MiB, 20)
            first = make_image(tmp_path / "a.img", 24 * MiB, [(0, old)])
            second = make_image(
                tmp_path / "b.img", 24 * MiB, [(0, old[: 8 * MiB]), (8 * MiB, noise(16 * MiB, 21))]
            )
            ids = [
                repofs("ingest", repo, "--vm", "vm", f"d0={i}").stdout.split()[-1]
                for i in (first, second, first)
            ]
            committed = {ids[-1]: digest_of_disk(repo, "vm", ids[-1])}
            fill = fs / "filler"
            compact_index(repo)
            fill_up(fill)
            out = repofs("prune", repo, "--keep-last", "1").stdout
            assert rp_ids(repo, "vm") == [ids[-1]]
            assert "gave up the repository's reserve" in out and not reserve.exists(), out
            fill.unlink()  # gc's part below needs the reserve: set it aside, fill up again
            assert set_aside(str(repo))
            compact_index(repo)
            fill_up(fill)

            aside = fs / "reserve.elsewhere"  # same file system: its space stays used
            reserve.rename(aside)
            proc = repofs("gc", repo, check=False)
            assert proc.returncode == 8, (proc.stdout, proc.stderr)
            assert_one_line_error(proc, "no space left")
            assert_healthy(repo, committed)

            aside.rename(reserve)
            free_before = free_bytes(fs, root=True)
            proc = repofs("gc", repo)
            assert "gave up the repository's reserve" in proc.stdout, proc.stdout
            assert "set aside" in proc.stdout and reserve.exists(), proc.stdout
            assert free_bytes(fs, root=True) > free_before + 14 * MiB  # the second image's data
            assert_healthy(repo, committed)
            fill.unlink()


def test_init_and_rebuild_index_on_a_filesystem_without_a_free_byte(tmp_path: Path) -> None:
    """LMDB creates its files sparsely and writes them through a memory map: on a full disk
    that was SIGBUS (no message) or EIO read as damage.  init now says "no space left";
    rebuild-index gives up the reserve, as prune and gc do, and rebuilds."""
    with small_filesystem(tmp_path) as fs:
        repo = fs / "repo"
        repofs("init", repo)
        img = make_image(tmp_path / "a.img", 4 * MiB, [(0, noise(4 * MiB, 30))])
        committed = ingest_committed(repo, img)
        fill = fs / "filler"
        subprocess.run(["dd", "if=/dev/zero", f"of={fill}", "bs=64k"], capture_output=True)
        subprocess.run(["dd", "if=/dev/zero", f"of={fill}.2", "bs=4k"], capture_output=True)
        proc = repofs("init", fs / "another", check=False)
        assert proc.returncode == 8, (proc.stdout, proc.stderr)
        assert_one_line_error(proc, "no space left")
        proc = repofs("rebuild-index", repo)
        assert "gave up the repository's reserve" in proc.stdout, proc.stdout
        assert_healthy(repo, committed)
        fill.unlink()
        Path(f"{fill}.2").unlink()


def test_unprotect_on_a_filesystem_without_a_free_byte(tmp_path: Path) -> None:
    """unprotect, the step before deleting a protected restore point to free space, gives up
    the reserve as delete does; it failed with "no space left" while the reserve stood."""
    with small_filesystem(tmp_path) as fs:
        repo = fs / "repo"
        repofs("init", repo)
        img = make_image(tmp_path / "a.img", 4 * MiB, [(0, noise(4 * MiB, 31))])
        rp = repofs("ingest", repo, "--vm", "vm", f"d0={img}").stdout.split()[-1]
        repofs("protect", repo, "vm", rp)
        fill = fs / "filler"
        # No free index page to reuse and no free block (4 KiB writes left up to 3 KiB on
        # this file system of 1 KiB blocks: enough for an encrypted repository's smaller
        # index write, so the test passed or failed by the repository's kind).
        compact_index(repo)
        fill_up(fill)
        proc = repofs("unprotect", repo, "vm", rp)
        assert "gave up the repository's reserve" in proc.stdout, proc.stdout
        assert f"vm/{rp}: unprotected" in proc.stdout
        repofs("delete", repo, "vm", rp)
        assert rp_ids(repo, "vm") == []
        fill.unlink()


def test_prune_gives_up_the_reserve_when_its_first_attempt_finds_no_space(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """prune's retry after giving up the reserve.  A real full disk does not make prune
    fail reliably (LMDB reuses free pages, ext4 keeps a few blocks), so the first attempt
    is made to fail the way a full disk fails it."""
    repo = new_repo(tmp_path / "repo")
    ids = [
        ingest_here(
            repo,
            "vm",
            {"d0": make_image(tmp_path / f"{k}.img", MiB, [(0, noise(MiB, k))])},
            now=1_700_000_000 + k,
        )
        for k in range(3)
    ]
    real_remove = prune_module._remove
    calls = []

    def full_once(*args: object) -> int:
        calls.append(1)
        if len(calls) == 1:
            raise NoSpaceError("writing pack x: no space left on the repository's filesystem")
        return real_remove(*args)

    monkeypatch.setattr(prune_module, "_remove", full_once)
    held = (repo / "reserve").stat().st_size
    result = prune_module.prune_repository(str(repo), prune_module.Policy(last=1))
    assert result.removed == 2 and result.reserve_given_up == held
    assert not (repo / "reserve").exists()
    assert rp_ids(repo, "vm") == [ids[-1]]
    assert collect_garbage(str(repo)).notes  # gc sets it aside again
    assert (repo / "reserve").stat().st_size == held


@pytest.fixture
def damaged_repo(tmp_path: Path) -> tuple[Path, dict[str, Path]]:
    """Three restore points of one VM, each in its own packs, with their source images."""
    repo = new_repo(tmp_path / "repo")
    sources = {}
    for k in range(3):
        img = make_image(tmp_path / f"{k}.img", 4 * MiB, [(0, noise(4 * MiB, 50 + k))])
        sources[ingest_here(repo, "vm", {"d0": img}, now=1_700_000_000 + k)] = img
    return repo, sources


class TestDamageAndRecovery:
    @pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
    def test_pack_damage(self, damaged_repo: tuple[Path, dict[str, Path]], damage: str) -> None:
        """verify names the hurt restore point; its damaged bytes read as errors, never wrong
        data; rebuild-index keeps everything the packs still hold."""
        repo, sources = damaged_repo
        ids = sorted(sources)
        hurt = ids[1]
        pack, offset, _s = chunk_record(repo, "vm", hurt, 2 * MiB)
        if damage == "flip":
            flip_byte(pack, offset + RECORD_HEADER_SIZE + 5)
        elif damage == "truncate":
            os.truncate(pack, offset + 5)
        else:
            pack.unlink()
        proc = repofs("verify", repo, check=False)
        assert proc.returncode == 5
        assert f"affects vm/{hurt} d0-flat.vmdk bytes" in proc.stdout
        for rp in ids:
            if rp != hurt:
                assert f"vm/{rp}" not in proc.stdout
        with pytest.raises(IntegrityError):
            read_range(repo, "vm", hurt, 2 * MiB, 4096)
        rebuilt = repofs("rebuild-index", repo, check=False)
        assert rebuilt.returncode == 5 and f"incomplete: vm/{hurt}" in rebuilt.stdout
        for rp in ids:
            if rp != hurt:
                assert read_disk(repo, "vm", rp) == sources[rp].read_bytes()
        with pytest.raises(IntegrityError):
            read_range(repo, "vm", hurt, 2 * MiB, 4096)
        if damage == "flip":  # only that chunk is lost
            assert read_range(repo, "vm", hurt, 0, 2 * MiB) == sources[hurt].read_bytes()[: 2 * MiB]
        assert f"vm/{hurt}" in repofs("verify", repo, check=False).stdout

    @pytest.mark.parametrize("damage", ["overwrite", "delete"])
    def test_index_damage(
        self, tmp_path: Path, damaged_repo: tuple[Path, dict[str, Path]], damage: str
    ) -> None:
        """A damaged or deleted data.mdb: verify names every restore point, mount and list
        refuse in one line, rebuild-index brings everything back."""
        repo, sources = damaged_repo
        data = repo / "index" / "data.mdb"
        if damage == "overwrite":
            size = data.stat().st_size
            with open(data, "r+b") as f:
                f.seek(8192)
                f.write(noise(size - 8192, 77))
        else:
            data.unlink()
        proc = repofs("verify", repo, check=False)
        assert proc.returncode == 5
        for rp in sources:
            assert f"vm/{rp} (unreadable until the index is rebuilt)" in proc.stdout
        assert_one_line_error(repofs("list", repo, check=False), "rebuild-index")
        (tmp_path / "mnt").mkdir()
        assert_one_line_error(repofs("mount", repo, tmp_path / "mnt", check=False), "rebuild-index")
        repofs("rebuild-index", repo)
        committed = {rp: digest_of_disk(repo, "vm", rp) for rp in sources}
        assert_healthy(repo, committed)
        for rp, src in sources.items():
            assert read_disk(repo, "vm", rp) == src.read_bytes()


def test_ingest_into_a_randomly_damaged_index_fails_in_one_line(tmp_path: Path) -> None:
    """Damaged B-tree pages sent LMDB past the end of data.mdb: ingest died of SIGBUS, with
    no error line, for about one damage pattern in four.  Now every pattern is an exit
    status and one line (or a clean ingest, where the damage is never walked into)."""
    base = new_repo(tmp_path / "base")
    images = []
    for k in range(3):  # a quarter repeated, a quarter holes: shared and zero chunks too
        repeated = noise(MiB, 60 + k)
        writes = [
            (i * MiB, noise(MiB, 100 * k + i) if i % 4 in (0, 3) else repeated)
            for i in range(64)
            if i % 4 != 2
        ]
        images.append(make_image(tmp_path / f"{k}.img", 64 * MiB, writes))
    for k, img in enumerate(images):
        repofs("ingest", base, "--vm", "ab"[k // 2], f"d0={img}")
    index = Index(str(base / "index"))
    used = (index.env.info()["last_pgno"] + 1) * index.env.stat()["psize"]
    index.close()
    for seed in range(12):
        repo = tmp_path / f"r{seed}"
        shutil.copytree(base, repo)
        rng = random.Random(seed)
        with open(repo / "index" / "data.mdb", "r+b") as f:
            f.truncate(used)  # no padding yet, as an index from before it was added
            for page in range(4 * 4096, used, 4096):
                f.seek(page + 100)
                f.write(rng.randbytes(64))
        proc = repofs("ingest", repo, "--vm", "a", f"d0={images[0]}", check=False)
        assert proc.returncode >= 0, f"seed {seed}: killed by signal {-proc.returncode}"
        if proc.returncode != 0:
            assert_one_line_error(proc)
        shutil.rmtree(repo)


class TestLmdbMapGrowth:
    def test_tiny_map_grows_instead_of_failing(self, tmp_path: Path) -> None:
        """With a 64 KiB initial map, ingests and gc grow it several times and never fail."""
        env = {"REPOFS_LMDB_MAP_SIZE": str(64 * 1024)}
        repo = tmp_path / "repo"
        repofs("init", repo, "--chunk-size", "4K", env=env)
        img = make_image(tmp_path / "a.img", 24 * MiB, [(0, noise(24 * MiB, 8))])
        procs = [spawn("ingest", repo, "--vm", f"vm{k}", f"d0={img}", env=env) for k in range(2)]
        for p in procs:
            _out, err = p.communicate(timeout=300)
            assert p.returncode == 0, err
        size = (repo / "index" / "data.mdb").stat().st_size
        assert size > 8 * 64 * 1024  # grew at least three doublings
        repofs("prune", repo, "--vm", "vm0", "--force", env=env)
        repofs("gc", repo, env=env)
        repofs("verify", repo, env=env)
        assert read_disk(repo, "vm1", rp_ids(repo, "vm1")[0]) == img.read_bytes()


def test_gc_after_rebuild_keeps_everything(damaged_repo: tuple[Path, dict[str, Path]]) -> None:
    """A rebuilt index is a complete index: gc after it deletes nothing that is used."""
    repo, sources = damaged_repo
    (repo / "index" / "data.mdb").unlink()
    rebuild_index(str(repo))
    collect_garbage(str(repo))
    for rp, src in sources.items():
        assert read_disk(repo, "vm", rp) == src.read_bytes()
    with Repository.open(str(repo)) as r:
        assert len(r.restore_points()) == 3


class TestGcBesideRebuild:
    def test_rebuild_before_gc_holds_the_lock_loses_nothing(self, tmp_path: Path) -> None:
        """Issue 18 item 1: an ingest killed between publishing its last pack and indexing it;
        gc opens the index; rebuild-index brings the killed restore point back whole; gc then
        takes the lock: it follows the new index, deletes nothing that index lists, verify
        passes and a second rebuild calls nothing incomplete."""
        repo = new_repo(tmp_path / "repo")
        img = make_image(tmp_path / "a.img", 4 * MiB, [(0, noise(4 * MiB, 1))])
        ingest_here(repo, "vm", {"d0": img}, now=1_700_000_000)
        img2 = make_image(tmp_path / "b.img", 4 * MiB, [(0, noise(4 * MiB, 2))])
        kept = ingest_here(repo, "vm", {"d0": img2}, now=1_700_000_100)
        repofs("prune", repo, "--keep-last", "1")  # garbage for gc to collect
        img3 = make_image(tmp_path / "c.img", 4 * MiB, [(0, noise(4 * MiB, 3))])
        killed_at("index-rp", tmp_path, "ingest", repo, "--vm", "vm", f"d0={img3}")
        assert rp_ids(repo, "vm") == [kept]
        gc = spawn("gc", repo, env={"REPOFS_TEST_GC_DELAY": "2"})
        wait_for_line(gc, "gc opened the index")
        out = repofs("rebuild-index", repo).stdout
        assert "incomplete" not in out
        back = [rp for rp in rp_ids(repo, "vm") if rp != kept]
        assert len(back) == 1  # the killed restore point, whole, as documented
        _out, gc_err = gc.communicate(timeout=120)
        assert gc.returncode == 0, gc_err
        committed = {
            kept: digest_of_disk(repo, "vm", kept),
            back[0]: digest_of_disk(repo, "vm", back[0]),
        }
        assert committed[back[0]] == hashlib.sha256(img3.read_bytes()).digest()
        assert_healthy(repo, committed)
        out = repofs("rebuild-index", repo).stdout
        assert "incomplete" not in out
        assert_healthy(repo, committed)
        collect_garbage(str(repo))
        assert_healthy(repo, committed)

    def test_killed_ingest_is_tombstoned_before_part_of_it_is_purged(self, tmp_path: Path) -> None:
        """An ingest's first pack is condemned by one gc while it runs; it is then killed
        between publishing its last pack and indexing it; a second gc purges that first pack
        but must keep the last one for an ingest still running: it tombstones the killed
        restore point first, so a rebuild-index leaves it out instead of calling it
        incomplete."""
        repo = new_repo(tmp_path / "repo")
        cfg_path = repo / "config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["pack_target_size"] = MiB  # the ingest below writes several packs
        cfg_path.write_text(json.dumps(cfg))
        small = make_image(tmp_path / "s.img", MiB, [(0, noise(MiB, 7))])
        kept = ingest_here(repo, "vm", {"d0": small}, now=1_700_000_000)
        committed = {kept: digest_of_disk(repo, "vm", kept)}
        script = tmp_path / "kill_at.py"
        script.write_text(KILL_AT_SCRIPT)
        img = make_image(tmp_path / "a.img", 6 * MiB, [(0, noise(6 * MiB, 8))])
        k = subprocess.Popen(
            [sys.executable, str(script), "ingest", str(repo), "--vm", "vm", f"d0={img}"],
            env=cli_env({"REPOFS_KILL_AT": "stop-then-index-rp"}),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + 60
            while Path(f"/proc/{k.pid}/stat").read_text().split(")")[1].split()[0] != "T":
                assert k.poll() is None and time.monotonic() < deadline
                time.sleep(0.02)
            first = repofs("gc", repo).stdout  # condemns the stopped ingest's first pack
            assert "that ingests still running may use" in first, first
            long = spawn(
                "ingest",
                repo,
                "--vm",
                "other",
                f"d0={small}",
                env={"REPOFS_TEST_PAUSE_BEFORE_COMMIT": "60"},
            )
            wait_for_line(long, "pausing before commit")
            k.send_signal(signal.SIGCONT)
            assert k.wait(timeout=60) == -signal.SIGKILL
            second = repofs("gc", repo).stdout  # purges the first generation, not the second
            assert "that ingests still running may use" in second, second
            kill9(long)
        finally:
            with contextlib.suppress(ProcessLookupError):
                k.kill()
            k.wait()
        out = repofs("rebuild-index", repo).stdout
        assert "incomplete" not in out
        assert_healthy(repo, committed)
