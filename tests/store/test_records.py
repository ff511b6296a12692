"""Restore point records: format 2 and the upgrade of version 1, consistency and notes, the
protected flag, ``delete``, and records that disagree with their maps.

``tests/data/v1-repository.tar.gz`` is a version-1 repository made by the code of main at
ceb7c86 (before format 2): ``init --chunk-size 4K``, then three ingests of VM ``web`` (disk
``d0`` = :func:`v1_day` of day 1, 2, 3; ``web.vmx`` with the first and third) a second
apart, then ``prune --keep-last 2``.  So it holds two restore points and a tombstone.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from repofs.errors import IntegrityError
from repofs.maintenance.gc import collect_garbage
from repofs.store.index import Index
from repofs.store.records import RecordType
from repofs.store.repository import Repository
from repofs.store.restorepoint import RestorePoint
from repofs.store.rprecords import Protection
from tests.support import maint
from tests.support.helpers import (
    assert_one_line_error,
    disk_doc,
    make_image,
    mounted,
    repofs,
    spawn,
)
from tests.support.maint import MiB, ingest_here, new_repo, read_disk, rp_ids, wait_for_line

FIXTURE = Path(__file__).parents[1] / "data" / "v1-repository.tar.gz"
V1_IDS = ["2026-12-07T162524Z", "2026-12-07T162525Z"]  # day 2 and day 3; day 1 was pruned
V1_PRUNED = "2026-12-07T162522Z"


def v1_day(day: int) -> bytes:
    """The disk ingested on ``day`` into the fixture: one zero chunk, 4 KiB of hashes, zeros."""
    data = b"".join(
        hashlib.sha256(f"v1 fixture day {day}: {i}".encode()).digest() for i in range(128)
    )
    return bytes(4096) + data + bytes(8192)


def v1_repo(tmp_path: Path) -> Path:
    with tarfile.open(FIXTURE) as tar:
        tar.extractall(tmp_path, filter="data")
    repo = tmp_path / "repo"
    os.chmod(repo, 0o700)
    return repo


def config_version(repo: Path) -> int:
    return int(json.loads((repo / "config.json").read_text())["version"])


def listing(repo: Path, *args: str) -> list[dict[str, object]]:
    return json.loads(repofs("list", repo, *args, "--json").stdout)


def image(tmp_path: Path, name: str, seed: int, size: int = 2 * MiB) -> Path:
    return make_image(tmp_path / name, size, [(0, maint.noise(size // 2, seed))])


def edit_rp_doc(repo: Path, vm: str, rp_id: str, **changes: object) -> None:
    """Change the index's copy of a restore point, as a buggy writer or a bit flip would."""
    with Repository.open(str(repo)) as r:

        def txn_fn(txn: object) -> None:
            doc = r.index.get_rp(txn, vm, rp_id)  # type: ignore[arg-type]
            assert doc is not None
            for key, value in changes.items():
                if key.startswith("disk_"):
                    doc["disks"][0][key[5:]] = value
                else:
                    doc[key] = value
            r.index.put_rp(txn, vm, rp_id, doc["seq"], doc)  # type: ignore[arg-type]

        r.index.write(txn_fn)


class TestFormatUpgrade:
    def test_a_version_1_repository_reads_without_being_upgraded(self, tmp_path: Path) -> None:
        """list, verify and the mount read a version-1 repository as it is and leave it
        version 1, readable by the repofs that made it."""
        repo = v1_repo(tmp_path)
        rps = listing(repo)
        assert [p["id"] for p in rps] == V1_IDS
        assert [(p["consistency"], p["note"], p["protected"]) for p in rps] == [
            ("crash", None, False)
        ] * 2
        assert "no problems found" in repofs("verify", repo).stdout
        assert read_disk(repo, "web", V1_IDS[0]) == v1_day(2)
        with mounted(repo, tmp_path / "mnt") as mnt:
            assert (mnt / "web" / V1_IDS[1] / "d0-flat.vmdk").read_bytes() == v1_day(3)
            assert (mnt / "web" / V1_IDS[1] / "web.vmx").read_bytes() == b"config\n"
        assert config_version(repo) == 1

    def test_the_first_command_that_writes_upgrades_it_in_place(self, tmp_path: Path) -> None:
        """An ingest into a version-1 repository makes it version 2 (every other config field
        kept), its old restore points read back the same, and rebuild-index still honours
        the version-1 tombstone."""
        repo = v1_repo(tmp_path)
        before = json.loads((repo / "config.json").read_text())
        img = tmp_path / "day4.img"
        img.write_bytes(v1_day(4))
        out = repofs(
            "ingest", repo, "--vm", "web", f"d0={img}", "--consistency", "filesystem"
        ).stdout
        new = out.split()[-1]
        after = json.loads((repo / "config.json").read_text())
        assert after == {**before, "version": 2}
        assert not [p for p in repo.iterdir() if ".tmp." in p.name]
        repofs("rebuild-index", repo)
        rps = listing(repo)
        assert [p["id"] for p in rps] == [*V1_IDS, new]
        assert [p["consistency"] for p in rps] == ["crash", "crash", "filesystem"]
        for rp_id, day in zip([*V1_IDS, new], (2, 3, 4), strict=True):
            assert read_disk(repo, "web", rp_id) == v1_day(day)
        assert V1_PRUNED not in rp_ids(repo)
        assert "no problems found" in repofs("verify", repo).stdout
        collect_garbage(str(repo))
        assert "no problems found" in repofs("verify", repo).stdout

    def test_the_upgrade_says_so_once(self, tmp_path: Path) -> None:
        """The command that upgrades warns on stderr (a mount an older repofs started shows
        a VM with a format-2 record as an I/O error until remounted); later ones do not."""
        repo = v1_repo(tmp_path)
        img = tmp_path / "day4.img"
        img.write_bytes(v1_day(4))
        first = repofs("ingest", repo, "--vm", "web", f"d0={img}", "--json")
        assert first.stderr.count("upgraded to format version 2") == 1
        assert "must be remounted" in first.stderr
        assert json.loads(first.stdout)["vm"] == "web"
        second = repofs("protect", repo, "web", "latest")
        assert "upgraded" not in second.stderr

    @pytest.mark.parametrize(
        "command",
        [["protect", "web", V1_IDS[0]], ["delete", "web", V1_IDS[0]], ["gc", "--threshold", "100"]],
    )
    def test_protect_delete_and_gc_upgrade_it_too(self, tmp_path: Path, command: list[str]) -> None:
        """Every command that writes a pack upgrades first; a record of format 2 never lands
        in a repository an older repofs would still open."""
        repo = v1_repo(tmp_path)
        repofs(command[0], repo, *command[1:])
        assert config_version(repo) == 2
        assert "no problems found" in repofs("verify", repo).stdout

    def test_a_newer_version_is_refused(self, tmp_path: Path) -> None:
        """A repository of a later format is refused in one line that says why, and left
        alone."""
        repo = v1_repo(tmp_path)
        cfg = json.loads((repo / "config.json").read_text())
        (repo / "config.json").write_text(json.dumps({**cfg, "version": 4}))
        for args in (["list", repo], ["protect", repo, "web", "latest"]):
            proc = repofs(*args, check=False)
            assert proc.returncode == 3
            assert_one_line_error(proc, "version 4 is not supported")
            assert "newer repofs" in proc.stderr
        assert config_version(repo) == 4

    def test_records_with_fields_of_a_later_change_still_read(self) -> None:
        """Optional keys this code does not know (changed-block tracking positions) are
        ignored when a restore point is read, at its top level and in its disks."""
        doc = {
            "format": 2,
            "vm": "web",
            "id": "2026-12-07T162524Z",
            "seq": 3,
            "vm_seq": 1,
            "created": 1.0,
            "chunk_size": 4096,
            "cbt": {"base": "x"},
            "disks": [disk_doc("d0", 4096, cbt_position="52:17")],
        }
        rp = RestorePoint.from_doc(doc)
        assert rp.disks[0].capacity == 4096 and rp.consistency == "crash"
        assert rp.inconsistency(4096, 1024) is None


class TestConsistencyAndNotes:
    def test_list_shows_them_and_rebuild_index_brings_them_back(self, tmp_path: Path) -> None:
        """--consistency and --note are in list and list --json, and come back from the
        packs alone, with the protected flag (the newest protect or unprotect wins)."""
        repo = tmp_path / "repo"
        repofs("init", repo, "--chunk-size", "64K")
        img = image(tmp_path, "a.img", 1)
        a = repofs(
            "ingest", repo, "--vm", "db", f"d0={img}", "--consistency", "application",
            "--note", "before the schema change",
        ).stdout.split()[-1]  # fmt: skip
        b = repofs("ingest", repo, "--vm", "db", f"d0={img}").stdout.split()[-1]
        repofs("protect", repo, "db", a, b)
        assert "already was" in repofs("protect", repo, "db", a).stdout
        repofs("unprotect", repo, "db", "latest")
        want = [
            ("application", "before the schema change", True),
            ("crash", None, False),
        ]
        got = [(p["consistency"], p["note"], p["protected"]) for p in listing(repo)]
        assert got == want
        header, first, second = repofs("list", repo).stdout.splitlines()
        assert "CONSISTENCY" in header and "PROTECTED" in header and header.endswith("NOTE")
        assert first.endswith("application yes        before the schema change")
        assert second.endswith("crash       -")
        repofs("rebuild-index", repo)
        assert [(p["consistency"], p["note"], p["protected"]) for p in listing(repo)] == want
        # from the packs alone, without an old index to copy anything from
        for name in os.listdir(repo / "index"):
            os.unlink(repo / "index" / name)
        os.rmdir(repo / "index")
        repofs("rebuild-index", repo)
        assert [(p["consistency"], p["note"], p["protected"]) for p in listing(repo)] == want

    @pytest.mark.parametrize(
        ("args", "needle"),
        [
            (["--consistency", "vss"], "Invalid value for '--consistency'"),
            (["--note", "two\nlines"], "one line of printable text"),
            (["--note", "x" * 1001], "at most 1000"),
        ],
    )
    def test_bad_values_are_one_line(self, tmp_path: Path, args: list[str], needle: str) -> None:
        """A consistency that is not one of the three, or a note that would break list's
        lines, is refused before anything is written."""
        repo = new_repo(tmp_path / "repo")
        img = image(tmp_path, "a.img", 1)
        proc = repofs("ingest", repo, "--vm", "db", f"d0={img}", *args, check=False)
        assert proc.returncode == 2
        assert_one_line_error(proc, needle)
        assert rp_ids(repo) == []


class TestProtect:
    def test_prune_keeps_protected_restore_points_and_says_so(self, tmp_path: Path) -> None:
        """A protected restore point survives a policy that keeps nothing, with the reason
        in the plan; once unprotected, the same prune removes it."""
        repo = new_repo(tmp_path / "repo")
        img = image(tmp_path, "a.img", 1)
        old = ingest_here(repo, "vm", {"d0": img}, now=1_700_000_000)
        new = ingest_here(repo, "vm", {"d0": img}, now=1_700_000_100)
        repofs("protect", repo, "vm", old)
        out = repofs("prune", repo, "--force", "--dry-run").stdout
        assert f"{old:<19} keep  (protected)" in out
        out = repofs("prune", repo, "--force").stdout
        assert rp_ids(repo) == [old]
        assert "removed 1 restore point(s)" in out
        proc = repofs("delete", repo, "vm", old, check=False)
        assert_one_line_error(proc, f"repofs unprotect {repo} vm {old}")
        repofs("unprotect", repo, "vm", old)
        repofs("prune", repo, "--force")
        assert rp_ids(repo) == []
        repofs("rebuild-index", repo)
        assert rp_ids(repo) == []
        assert new  # removed first, by the first prune

    def test_a_half_removed_restore_point_cannot_be_protected(self, tmp_path: Path) -> None:
        """A restore point whose prune was killed after its tombstone is refused by protect
        (rebuild-index would drop it all the same); delete finishes the removal."""
        repo = new_repo(tmp_path / "repo")
        rp = ingest_here(repo, "vm", {"d0": image(tmp_path, "a.img", 1)})
        with Repository.open(str(repo)) as r:
            r.write_tombstones([r.resolve("vm", rp)])  # what a prune killed here leaves
        proc = repofs("protect", repo, "vm", rp, check=False)
        assert proc.returncode == 2
        assert_one_line_error(proc, "was being removed")
        assert [p["protected"] for p in listing(repo)] == [False]
        repofs("delete", repo, "vm", rp)
        assert rp_ids(repo) == []

    def test_a_flag_already_set_is_written_again(self, tmp_path: Path) -> None:
        """protect after an unprotect killed between its record and its transaction (the
        index still says protected) writes its own record: rebuild-index and prune keep it."""
        repo = new_repo(tmp_path / "repo")
        rp = ingest_here(repo, "vm", {"d0": image(tmp_path, "a.img", 1)})
        repofs("protect", repo, "vm", rp)
        with Repository.open(str(repo)) as r:  # what an unprotect killed here leaves
            target = r.resolve("vm", rp)
            flag_seq = r.index.write(r.index.next_seq)
            writer = r.writer()
            writer.put_new(
                RecordType.PROTECTION, Protection("vm", rp, target.seq, flag_seq, False).body()
            )
            writer.flush()
        assert "(it already was)" in repofs("protect", repo, "vm", rp).stdout
        repofs("rebuild-index", repo)
        assert [p["protected"] for p in listing(repo)] == [True]
        repofs("prune", repo, "--force")
        assert rp_ids(repo) == [rp]

    @pytest.mark.parametrize("command", ["protect", "delete"])
    def test_a_rebuild_while_waiting_for_the_lock_is_followed(
        self, tmp_path: Path, command: str
    ) -> None:
        """protect and delete that waited for a rebuild-index act on the new index; they
        failed with "the index was replaced ... run the command again"."""
        repo = new_repo(tmp_path / "repo")
        rp = ingest_here(repo, "vm", {"d0": image(tmp_path, "a.img", 1)})
        rebuilt = tmp_path / "copy"
        shutil.copytree(repo, rebuilt)
        repofs("rebuild-index", rebuilt)
        fds = [
            os.open(repo / name, os.O_RDWR | os.O_CREAT, 0o600)
            for name in ("lock.gate", "lock.main")
        ]
        try:
            for fd in fds:  # as rebuild-index holds them, up to its swap
                fcntl.flock(fd, fcntl.LOCK_EX)
            proc = spawn(command, repo, "vm", rp)
            wait_for_line(proc, "waiting")
            os.rename(repo / "index", tmp_path / "index.old")
            shutil.copytree(rebuilt / "index", repo / "index")
        finally:
            for fd in fds:
                os.close(fd)
        _out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        if command == "protect":
            assert [p["protected"] for p in listing(repo)] == [True]
        else:
            assert rp_ids(repo) == []

    def test_gc_keeps_protection_records(self, tmp_path: Path) -> None:
        """gc keeps the small pack that holds a protection record (nothing else references
        it), even when it rewrites every pack: rebuild-index after gc still knows the flag."""
        repo = new_repo(tmp_path / "repo")
        rp = ingest_here(repo, "vm", {"d0": image(tmp_path, "a.img", 1)})
        repofs("protect", repo, "vm", rp)
        repofs("gc", repo, "--threshold", "100")
        repofs("rebuild-index", repo)
        assert [p["protected"] for p in listing(repo)] == [True]


class TestDelete:
    def test_delete_by_id_is_durable(self, tmp_path: Path) -> None:
        """--dry-run changes nothing; delete removes only the named restore point, its child
        reads back whole, and neither rebuild-index nor gc brings it back."""
        repo = new_repo(tmp_path / "repo")
        imgs = [image(tmp_path, f"{i}.img", i) for i in range(3)]
        ids = [
            ingest_here(repo, "vm", {"d0": p}, now=1_700_000_000 + i) for i, p in enumerate(imgs)
        ]
        out = repofs("delete", repo, "vm", ids[1], "--dry-run").stdout
        assert f"{ids[1]:<19} would delete" in out and rp_ids(repo) == ids
        got = json.loads(repofs("delete", repo, "vm", ids[1], ids[1], "--json").stdout)
        assert got == {
            "vm": "vm",
            "dry_run": False,
            "restore_points": [ids[1]],
            "removed": 1,
            "reserve_given_up": 0,
        }
        assert rp_ids(repo) == [ids[0], ids[2]]
        repofs("rebuild-index", repo)
        collect_garbage(str(repo))
        assert rp_ids(repo) == [ids[0], ids[2]]
        assert read_disk(repo, "vm", ids[2]) == imgs[2].read_bytes()
        assert "no problems found" in repofs("verify", repo).stdout

    @pytest.mark.parametrize(
        ("which", "needle"),
        [
            ("latest", "not 'latest'"),
            ("2001-01-01T000000Z", "has no restore point '2001-01-01T000000Z'"),
            ("protected", "is protected; run 'repofs unprotect"),
        ],
    )
    def test_refusals_delete_nothing(self, tmp_path: Path, which: str, needle: str) -> None:
        """'latest', an unknown id or a protected restore point among the ids is one line,
        and none of the others is deleted either."""
        repo = new_repo(tmp_path / "repo")
        img = image(tmp_path, "a.img", 1)
        a = ingest_here(repo, "vm", {"d0": img}, now=1_700_000_000)
        b = ingest_here(repo, "vm", {"d0": img}, now=1_700_000_100)
        if which == "protected":
            repofs("protect", repo, "vm", b)
            which = b
        proc = repofs("delete", repo, "vm", a, which, check=False)
        assert proc.returncode == 2
        assert_one_line_error(proc, needle)
        assert rp_ids(repo) == [a, b]

    def test_delete_is_the_way_out_of_a_refusing_gc(self, tmp_path: Path) -> None:
        """After rebuild-index drops a damaged chunk, gc refuses and names 'repofs delete';
        deleting the restore points that need the chunk lets gc run again."""
        repo = new_repo(tmp_path / "repo")
        damaged = ingest_here(repo, "vm", {"d0": image(tmp_path, "a.img", 1)}, now=1_700_000_000)
        good = image(tmp_path, "b.img", 2)
        kept = ingest_here(repo, "vm", {"d0": good}, now=1_700_000_100)
        pack, offset, _s = maint.chunk_record(repo, "vm", damaged, 0)
        maint.flip_byte(pack, offset + 60)
        repofs("rebuild-index", repo, check=False)
        proc = repofs("gc", repo, check=False)
        assert proc.returncode == 5
        assert_one_line_error(proc, "'repofs delete REPO VM ID...'")
        repofs("delete", repo, "vm", damaged)
        result = collect_garbage(str(repo))
        assert result.warnings == []
        assert rp_ids(repo) == [kept]
        assert read_disk(repo, "vm", kept) == good.read_bytes()


class TestInconsistentRecords:
    def test_a_capacity_beyond_the_map_is_eio_not_zeros(self, tmp_path: Path) -> None:
        """A restore point whose record claims more capacity than its map covers is shown,
        but every read of its disk is EIO (logged once), never zeros; verify names it."""
        repo = new_repo(tmp_path / "repo")
        img = image(tmp_path, "a.img", 1, size=MiB)
        rp = ingest_here(repo, "vm", {"d0": img})
        edit_rp_doc(repo, "vm", rp, disk_capacity=MiB + 128 * 1024)
        for mounts, mode in enumerate(((), ("--direct-io",)), start=1):
            with mounted(repo, tmp_path / "mnt", *mode) as mnt:
                flat = mnt / "vm" / rp / "d0-flat.vmdk"
                assert flat.stat().st_size == MiB + 128 * 1024
                for skip in (0, 16):  # the stored start, and the tail past the map
                    dd = subprocess.run(
                        ["dd", f"if={flat}", "of=/dev/null", "bs=64K", f"skip={skip}"],
                        capture_output=True,
                        text=True,
                    )
                    assert dd.returncode != 0 and "Input/output error" in dd.stderr
            log = (tmp_path / "mnt.log").read_text()
            assert log.count("inconsistent restore point record") == mounts  # once per mount
        with pytest.raises(IntegrityError, match="needs 18 chunks"):
            read_disk(repo, "vm", rp)
        out = repofs("verify", repo, check=False).stdout
        assert f"PROBLEM restore point vm/{rp}: its record disagrees with its map" in out

    def test_rebuild_index_names_an_inconsistent_record(self, tmp_path: Path) -> None:
        """A restore point whose own record disagrees with its map comes back from the packs
        listed, named by rebuild-index (exit 5), and unreadable rather than short."""
        repo = new_repo(tmp_path / "repo")
        rp = ingest_here(repo, "vm", {"d0": image(tmp_path, "a.img", 1, size=MiB)})
        with Repository.open(str(repo)) as r:
            bad = r.resolve("vm", rp)
            bad.id, bad.seq, bad.record = "2001-01-01T000000Z", 999, None
            bad.disks[0].capacity += 64 * 1024
            writer = r.writer()
            writer.put_new(RecordType.RESTORE_POINT, json.dumps(bad.to_doc()).encode())
            writer.flush()
        proc = repofs("rebuild-index", repo, check=False)
        assert proc.returncode == 5
        assert "incomplete: vm/2001-01-01T000000Z: its record disagrees with its map" in (
            proc.stdout
        )
        assert rp_ids(repo) == ["2001-01-01T000000Z", rp]
        with pytest.raises(IntegrityError, match="inconsistent restore point record"):
            read_disk(repo, "vm", "2001-01-01T000000Z")
        assert read_disk(repo, "vm", rp) == (tmp_path / "a.img").read_bytes()

    def test_a_short_map_under_a_consistent_record_is_eio(self, tmp_path: Path) -> None:
        """The reader itself refuses to assemble fewer bytes than asked for: a map that ends
        early is an error, not a short read."""
        from repofs.read.diskread import ChunkCache, DiskReader

        repo = new_repo(tmp_path / "repo")
        rp = ingest_here(repo, "vm", {"d0": image(tmp_path, "a.img", 1, size=MiB)})
        with Repository.open(str(repo)) as r:
            disk = r.resolve("vm", rp).disks[0]
            reader = DiskReader(r, disk, ChunkCache(r, 8 * MiB))
            disk.capacity += 64 * 1024  # the record changed under a reader already built
            with pytest.raises(IntegrityError, match="ends at chunk 16"):
                reader.read(MiB - 4096, 8192)

    @pytest.mark.slow
    def test_a_failed_final_index_write_leaves_nothing_to_revive(self, tmp_path: Path) -> None:
        """An ingest whose last index transaction meets a full disk fails in one line and
        tombstones its published record (with the repository's reserve): rebuild-index
        does not bring it back, as after a stop."""
        from tests.maintenance.test_faults import compact_index, fill_up, small_filesystem

        with small_filesystem(tmp_path, 64) as fs:
            repo = fs / "repo"
            repofs("init", repo, "--chunk-size", "64K")
            first = repofs(
                "ingest", repo, "--vm", "vm", f"d0={image(tmp_path, 'a.img', 1)}"
            ).stdout.split()[-1]
            compact_index(repo)  # no free pages to reuse
            # A reader older than the ingest keeps every page the ingest frees pinned, so its
            # last transaction needs new blocks too, whatever its earlier ones freed.
            index = Index(str(repo / "index"))
            proc = None
            try:
                with index.reading():
                    proc = spawn(
                        "ingest",
                        repo,
                        "--vm",
                        "vm",
                        f"d0={image(tmp_path, 'b.img', 2)}",
                        env={"REPOFS_TEST_PAUSE_BEFORE_COMMIT": "3"},
                    )
                    maint.wait_for_line(proc, "pausing before commit")
                    fill_up(fs / "filler")
                    crumbs = ["dd", "if=/dev/zero", f"of={fs / 'crumbs'}", "bs=4k"]
                    subprocess.run(crumbs, capture_output=True)
                    _out, err = proc.communicate(timeout=120)
            finally:
                index.close()
                if proc is not None and proc.poll() is None:
                    maint.kill9(proc)
            assert proc.returncode == 8, err
            assert err.count("\n") == 1 and "no space left" in err
            (fs / "filler").unlink()
            (fs / "crumbs").unlink()
            assert rp_ids(repo, "vm") == [first]
            repofs("rebuild-index", repo)
            assert rp_ids(repo, "vm") == [first]
            assert "no problems found" in repofs("verify", repo).stdout
