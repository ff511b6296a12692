"""What scripts rely on: ``--json`` documents, ``--progress``, ``REPOFS_REPOSITORY``, ``info``."""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.helpers import (
    assert_one_line_error,
    cli_env,
    ingest,
    is_mounted,
    make_image,
    repofs,
    unmount,
)
from tests.support.maint import chunk_record, flip_byte, noise

MiB = 1 << 20
CS = 128 * 1024  # the default chunk size


def json_of(proc: subprocess.CompletedProcess[str]) -> object:
    """stdout is exactly one JSON document."""
    return json.loads(proc.stdout)


@pytest.fixture
def one_rp(tmp_path: Path, repo: Path) -> tuple[Path, Path, str]:
    """A repository with one restore point of one 4 MiB disk of random bytes."""
    img = make_image(tmp_path / "d.img", 4 * MiB, [(0, noise(4 * MiB, 1))])
    return repo, img, ingest(repo, "vm", f"d0={img}")


class TestJson:
    def test_ingest(self, tmp_path: Path, repo: Path) -> None:
        """ingest --json prints the restore point (id, vm, disks, bytes read and stored), only."""
        img = make_image(tmp_path / "d.img", 2 * MiB, [(0, noise(2 * MiB, 2))])
        doc = json_of(repofs("ingest", repo, "--vm", "web", f"d0={img}", "--json"))
        assert isinstance(doc, dict)
        assert doc["vm"] == "web" and doc["kind"] == "full" and doc["parent"] is None
        assert doc["bytes_read"] == 2 * MiB and 2 * MiB <= doc["bytes_new"] < 2 * MiB + 4096
        (disk,) = doc["disks"]
        assert disk["name"] == "d0" and disk["capacity"] == 2 * MiB and disk["format"] == "raw"
        assert doc["seconds"] >= 0
        listed = json_of(repofs("list", repo, "--json"))
        assert isinstance(listed, list) and listed[0]["id"] == doc["id"]
        assert {k: v for k, v in doc.items() if k != "seconds"} == listed[0]

    def test_verify_ok_and_with_problems(self, one_rp: tuple[Path, Path, str]) -> None:
        """verify --json says ok; with damage it lists the problems and still exits 5."""
        repo, _img, rp = one_rp
        doc = json_of(repofs("verify", repo, "--json"))
        assert isinstance(doc, dict)
        assert doc["ok"] is True and doc["problems"] == [] and doc["restore_points"] == 1
        pack, offset, _n = chunk_record(repo, "vm", rp, 2 * MiB)
        flip_byte(pack, offset + 100)
        proc = repofs("verify", repo, "--json", check=False)
        assert proc.returncode == 5
        assert_one_line_error(proc, "verify found 1 problem(s)")
        doc = json_of(proc)
        assert isinstance(doc, dict) and doc["ok"] is False
        (problem,) = doc["problems"]
        assert set(problem) == {"subject", "message", "affects"}
        assert problem["affects"] == [f"vm/{rp} d0-flat.vmdk bytes {2 * MiB}-{2 * MiB + CS - 1}"]

    def test_prune_and_gc(self, tmp_path: Path, repo: Path) -> None:
        """prune --json names what it kept and removed; gc --json what it freed."""
        img = make_image(tmp_path / "d.img", MiB, [(0, noise(MiB, 3))])
        first = ingest(repo, "vm", f"d0={img}")
        make_image(img, MiB, [(0, noise(MiB, 4))])
        second = ingest(repo, "vm", f"d0={img}")
        dry = json_of(repofs("prune", repo, "--keep-last", "1", "-n", "--json"))
        assert isinstance(dry, dict) and dry["dry_run"] is True and dry["removed_count"] == 0
        doc = json_of(repofs("prune", repo, "--keep-last", "1", "--json"))
        assert isinstance(doc, dict) and doc["dry_run"] is False
        assert doc["kept"] == [{"vm": "vm", "id": second, "reasons": ["last #1"]}]
        assert doc["removed"] == [{"vm": "vm", "id": first}] == dry["removed"]
        assert doc["removed_count"] == 1
        gc = json_of(repofs("gc", repo, "--threshold", "100", "--json"))
        assert isinstance(gc, dict) and gc["dry_run"] is False
        assert gc["freed"] > 0 and gc["freed"] == gc["bytes_freed"] - gc["bytes_written"]
        assert gc["restore_points"] == 1 and gc["warnings"] == []

    def test_rebuild_index_complete_and_incomplete(self, one_rp: tuple[Path, Path, str]) -> None:
        """rebuild-index --json counts restore points; an incomplete one is listed, exit 5."""
        repo, _img, rp = one_rp
        doc = json_of(repofs("rebuild-index", repo, "--json"))
        assert isinstance(doc, dict)
        assert doc["restore_points"] == 1 and doc["vms"] == 1 and doc["incomplete"] == []
        pack, offset, _n = chunk_record(repo, "vm", rp, MiB)
        flip_byte(pack, offset + 20)  # the record's header: the rebuild leaves it out
        proc = repofs("rebuild-index", repo, "--json", check=False)
        assert proc.returncode == 5
        assert_one_line_error(proc, "1 restore point(s) are incomplete")
        doc = json_of(proc)
        assert isinstance(doc, dict) and len(doc["incomplete"]) == 1 and doc["damaged"]

    def test_protect_and_unprotect(self, one_rp: tuple[Path, Path, str]) -> None:
        """protect --json names the id 'latest' resolved to and whether it changed;
        unprotect --json likewise; a refusal prints nothing on stdout."""
        repo, _img, rp = one_rp
        doc = json_of(repofs("protect", repo, "vm", "latest", rp, "--json"))
        assert doc == {
            "vm": "vm",
            "protected": True,
            "restore_points": [{"id": rp, "changed": True}],
            "reserve_given_up": 0,
        }
        doc = json_of(repofs("unprotect", repo, "vm", rp, "--json"))
        assert doc == {
            "vm": "vm",
            "protected": False,
            "restore_points": [{"id": rp, "changed": True}],
            "reserve_given_up": 0,
        }
        proc = repofs("protect", repo, "vm", "nope", "--json", check=False)
        assert_one_line_error(proc, "no restore point 'nope'")
        assert proc.stdout == ""

    def test_stats_and_errors(self, repo: Path, tmp_path: Path) -> None:
        """stats --json is one document; an error under --json is still one line on stderr."""
        doc = json_of(repofs("stats", repo, "--json"))
        assert isinstance(doc, dict) and doc["restore_points"] == 0
        proc = repofs("gc", tmp_path / "nowhere", "--json", check=False)
        assert_one_line_error(proc, "no such repository")
        assert proc.stdout == ""


class TestProgress:
    def test_forced_on_and_off(self, one_rp: tuple[Path, Path, str]) -> None:
        """--progress draws the bar into a pipe; --no-progress keeps a terminal silent."""
        repo, img, _rp = one_rp
        proc = repofs("ingest", repo, "--vm", "vm", f"d0={img}", "--progress")
        assert "MB/s" in proc.stderr and "ETA" in proc.stderr and "4.0 MiB" in proc.stderr
        assert "ETA" not in repofs("ingest", repo, "--vm", "vm", f"d0={img}").stderr
        assert "verify: " in repofs("verify", repo, "--progress").stderr
        assert "rebuild-index: " in repofs("rebuild-index", repo, "--progress").stderr
        cmd = (
            f"{sys.executable} -m repofs ingest {repo} --vm vm d0={img} --no-progress; "
            f"{sys.executable} -m repofs verify {repo} --no-progress"
        )
        tty = subprocess.run(
            ["script", "-qec", cmd, "/dev/null"],
            capture_output=True,
            text=True,
            env=cli_env(),
            timeout=300,
        )
        assert tty.returncode == 0, tty.stdout
        assert "no problems found" in tty.stdout  # both ran, on a terminal
        assert "ETA" not in tty.stdout


class TestRepositoryVariable:
    def test_names_the_repository(self, tmp_path: Path, repo: Path) -> None:
        """With REPOFS_REPOSITORY set, REPO may be left out; one given still wins."""
        env = {"REPOFS_REPOSITORY": str(repo)}
        img = make_image(tmp_path / "d.img", MiB, [(0, noise(MiB, 5))])
        out = repofs("ingest", "--vm", "vm", f"d0={img}", env=env).stdout
        rp = out.splitlines()[-1]
        assert json_of(repofs("list", "--json", env=env))[0]["id"] == rp  # type: ignore[index]
        assert "restore points       1" in repofs("stats", env=env).stdout
        assert "no problems found" in repofs("verify", env=env).stdout
        other = tmp_path / "other"
        repofs("init", other)
        elsewhere = {"REPOFS_REPOSITORY": str(other)}
        assert "no restore points" in repofs("list", env=elsewhere).stdout
        assert rp in repofs("list", repo, env=elsewhere).stdout
        # a DISK=SOURCE first is a disk; a lone argument of list is REPO, never a VM
        assert repofs("ingest", repo, "--vm", "vm", f"d0={img}", env=elsewhere).returncode == 0
        proc = repofs("list", "vm", env=env, check=False)
        assert_one_line_error(proc, "vm: no such repository")

    def test_delete_and_protect_without_repo(self, tmp_path: Path, repo: Path) -> None:
        """delete, protect and unprotect take VM RP... alone when the variable names REPO."""
        env = {"REPOFS_REPOSITORY": str(repo)}
        img = make_image(tmp_path / "d.img", MiB, [(0, noise(MiB, 6))])
        rp = repofs("ingest", "--vm", "vm", f"d0={img}", env=env).stdout.splitlines()[-1]
        assert "protected" in repofs("protect", "vm", rp, env=env).stdout
        assert json_of(repofs("list", "--json", env=env))[0]["protected"] is True  # type: ignore[index]
        repofs("unprotect", repo, "vm", rp, env=env)  # an explicit REPO still wins
        doc = json_of(repofs("delete", "vm", rp, "--dry-run", "--json", env=env))
        assert doc["restore_points"] == [rp] and doc["dry_run"] is True  # type: ignore[index]
        proc = repofs("delete", "vm", check=False, env=env)
        assert_one_line_error(proc, "name the VM and at least one RP")
        assert proc.returncode == 2

    def test_a_vm_named_like_a_directory_here(self, tmp_path: Path, repo: Path) -> None:
        """Run where a VM's disks lie in a directory of its name, protect and delete still
        take that name as the VM; a repository named here without '/' is still REPO."""
        env = cli_env({"REPOFS_REPOSITORY": str(repo)})
        (tmp_path / "web01").mkdir()
        img = make_image(tmp_path / "web01" / "d.img", MiB, [(0, noise(MiB, 7))])
        rp = ingest(repo, "web01", f"d0={img}")

        def here(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [sys.executable, "-m", "repofs", *args],
                capture_output=True,
                text=True,
                env=env,
                cwd=tmp_path,
                timeout=300,
            )

        proc = here("protect", "web01", "latest")
        assert proc.returncode == 0, proc.stderr
        assert json_of(repofs("list", repo, "--json"))[0]["protected"] is True  # type: ignore[index]
        proc = here("unprotect", repo.name, "web01", rp)  # the repository itself, by name
        assert proc.returncode == 0, proc.stderr
        doc = json_of(here("delete", "web01", rp, "--dry-run", "--json"))
        assert doc["restore_points"] == [rp]  # type: ignore[index]

    def test_mount_takes_a_lone_mount_point(
        self, tmp_path: Path, one_rp: tuple[Path, Path, str]
    ) -> None:
        """mount MOUNTPOINT alone mounts the repository the variable names."""
        repo, _img, rp = one_rp
        mnt = tmp_path / "mnt"
        mnt.mkdir()
        try:
            repofs("mount", mnt, "--log", tmp_path / "m.log", env={"REPOFS_REPOSITORY": str(repo)})
            assert is_mounted(mnt)
            assert (mnt / "vm" / rp / "d0-flat.vmdk").stat().st_size == 4 * MiB
        finally:
            unmount(mnt)

    def test_neither_given_is_one_line(self, tmp_path: Path) -> None:
        """Without REPO and without the variable each command says so in one line, exit 2."""
        img = make_image(tmp_path / "d.img", MiB)
        for args in (
            ["list"],
            ["stats", "--json"],
            ["verify"],
            ["gc"],
            ["prune", "--keep-last", "1"],
            ["rebuild-index"],
            ["info"],
            ["init"],
            ["ingest", "--vm", "vm", f"d0={img}"],
        ):
            for env in ({}, {"REPOFS_REPOSITORY": ""}):
                proc = repofs(*args, env=env, check=False)
                assert_one_line_error(proc, "no repository given", "REPOFS_REPOSITORY")
                assert proc.returncode == 2, args
        proc = repofs("mount", tmp_path, check=False)
        assert_one_line_error(proc, "Missing argument 'MOUNTPOINT'")


class TestInfo:
    def test_fields_and_a_held_lock(self, one_rp: tuple[Path, Path, str]) -> None:
        """info shows format, chunking, encryption and sizes, and names a lock's holder."""
        repo, _img, _rp = one_rp
        doc = json_of(repofs("info", repo, "--json"))
        assert isinstance(doc, dict)
        assert doc["format"] == "repofs" and doc["version"] == 3
        assert doc["chunk_size"] == CS and doc["compression"] == "zstd:3"
        assert doc["encryption"] == "aes-256-gcm" and doc["key"] == "passphrase"
        assert doc["vms"] == 1 and doc["restore_points"] == 1
        assert doc["pack_count"] >= 1 and doc["pack_bytes"] > 3 * MiB
        assert doc["index_bytes"] > 0 and doc["total_bytes"] >= doc["pack_bytes"]
        assert doc["locks"] == []
        fd = os.open(repo / "lock.main", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)  # as an ingest holds it
            doc = json_of(repofs("info", repo, "--json"))
            assert isinstance(doc, dict)
            (lock,) = doc["locks"]
            assert lock["file"] == "lock.main" and lock["mode"] == "shared"
            assert lock["pid"] == os.getpid() and not lock["waiting"]
            assert "pytest" in lock["command"] or "python" in lock["command"]
            text = repofs("info", repo).stdout
            assert f"lock.main shared, held by pid {os.getpid()}" in text
            assert "encryption           aes-256-gcm" in text
        finally:
            os.close(fd)
        assert "locks held           none" in repofs("info", repo).stdout

    def test_the_keep_lock_is_named(self, one_rp: tuple[Path, Path, str]) -> None:
        """info names the holder of lock.keep (a prune, delete or protect), for which a
        waiting protect says it waits."""
        repo, _img, _rp = one_rp
        repofs("protect", repo, "vm", "latest")  # makes lock.keep
        fd = os.open(repo / "lock.keep", os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # as a prune holds it from its plan to its commit
            doc = json_of(repofs("info", repo, "--json"))
            assert isinstance(doc, dict)
            (lock,) = doc["locks"]
            assert lock["file"] == "lock.keep" and lock["mode"] == "exclusive"
            assert lock["pid"] == os.getpid()
        finally:
            os.close(fd)
