"""A repository whose parts disagree or cannot be written: an emptied or older index, missing
packs, read-only storage, lock files and directories that are not what they should be.

Each must fail in one line and keep every stored byte; none may make gc collect backups.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.support.helpers import assert_one_line_error, cli_argv, cli_env, make_image, repofs
from tests.support.maint import MiB, ingest_here, new_repo, noise, pack_files, read_disk, rp_ids


@pytest.fixture
def two_vms(tmp_path: Path) -> tuple[Path, Path]:
    """A repository with one restore point of each of two VMs; returns (repo, web's image)."""
    repo = new_repo(tmp_path / "repo")
    web = make_image(tmp_path / "web.img", 2 * MiB, [(0, noise(2 * MiB, 1))])
    db = make_image(tmp_path / "db.img", MiB, [(0, noise(MiB, 2))])
    ingest_here(repo, "web", {"d0": web})
    ingest_here(repo, "db", {"d0": db})
    return repo, web


def _files(repo: Path) -> dict[str, bytes]:
    return {str(p.relative_to(repo)): p.read_bytes() for p in pack_files(repo)}


def test_an_emptied_index_is_damage_not_an_empty_repository(two_vms: tuple[Path, Path]) -> None:
    """LMDB would take a 0-byte data.mdb for a new index: no restore points, and gc would
    delete every pack as unindexed.  Every command refuses; rebuild-index brings all back."""
    repo, web = two_vms
    before = rp_ids(repo)
    packs = _files(repo)
    (repo / "index" / "data.mdb").write_bytes(b"")
    for cmd in ("list", "gc", "prune"):
        args = ("--keep-last", "1") if cmd == "prune" else ()
        assert_one_line_error(repofs(cmd, repo, *args, check=False), "rebuild-index")
    proc = repofs("verify", repo, check=False)
    assert proc.returncode != 0 and "the index is empty" in proc.stdout
    assert _files(repo) == packs
    repofs("rebuild-index", repo)
    assert rp_ids(repo) == before
    assert read_disk(repo, "web", rp_ids(repo, "web")[0]) == web.read_bytes()


def test_gc_keeps_the_backups_an_older_index_does_not_know(
    tmp_path: Path, two_vms: tuple[Path, Path]
) -> None:
    """An index copied back from before the last ingest: the packs of that ingest are unindexed
    but hold a committed restore point.  verify names it, gc (also -n) stops before deleting
    anything, and after rebuild-index the restore point reads back and gc is clean."""
    repo, web = two_vms
    old_index = tmp_path / "index.old"
    shutil.copytree(repo / "index", old_index)
    (tmp_path / "web.img").write_bytes(noise(2 * MiB, 3))
    newest = ingest_here(repo, "web", {"d0": web})
    shutil.rmtree(repo / "index")
    shutil.copytree(old_index, repo / "index")
    packs = _files(repo)

    proc = repofs("verify", repo, check=False)
    assert proc.returncode != 0, proc.stdout
    assert "the index is older than the packs" in proc.stdout and f"web/{newest}" in proc.stdout
    for args in (("-n",), ()):
        assert_one_line_error(
            repofs("gc", repo, *args, check=False), "stopped before deleting anything", newest
        )
    assert _files(repo) == packs

    repofs("rebuild-index", repo)
    assert newest in rp_ids(repo, "web")
    assert read_disk(repo, "web", newest) == web.read_bytes()
    assert "removed 0 unindexed pack(s)" in repofs("gc", repo).stdout
    repofs("verify", repo)


def test_rebuild_index_keeps_the_index_when_the_packs_are_not_there(
    two_vms: tuple[Path, Path],
) -> None:
    """A missing or empty packs/ is far likelier a mistake than a repository that lost every
    pack: rebuilding would throw away the index, the one thing left."""
    repo, _web = two_vms
    before = rp_ids(repo)
    shutil.move(repo / "packs", repo.parent / "packs.away")
    assert_one_line_error(repofs("rebuild-index", repo, check=False), "missing", "left as it is")
    (repo / "packs").mkdir()
    assert_one_line_error(repofs("rebuild-index", repo, check=False), "holds no packs")
    shutil.rmtree(repo / "packs")
    shutil.move(repo.parent / "packs.away", repo / "packs")
    assert rp_ids(repo) == before
    repofs("verify", repo)


def test_a_read_only_repository_is_not_called_damaged(
    tmp_path: Path, two_vms: tuple[Path, Path]
) -> None:
    """On a read-only bind mount the commands say so, in one line, and do not send the
    administrator to rebuild-index (which could not help)."""
    repo, web = two_vms
    ro = tmp_path / "ro"
    ro.mkdir()
    subprocess.run(["mount", "--bind", str(repo), str(ro)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(ro)], check=True)
        for args in (("list",), ("verify",), ("ingest", "--vm", "web", f"d0={web}")):
            proc = repofs(args[0], ro, *args[1:], check=False)
            assert_one_line_error(proc, "read-only file system")
            assert "rebuild-index" not in proc.stderr + proc.stdout
        assert_one_line_error(repofs("rebuild-index", ro, check=False), "Read-only file system")
    finally:
        subprocess.run(["umount", str(ro)], check=True)
    repofs("verify", repo)


def test_odd_files_in_the_repository_give_one_line_errors(two_vms: tuple[Path, Path]) -> None:
    """A lock file that became a directory, packs/ that became a file, a repository inside
    another: one line each, and nothing stored changes."""
    repo, web = two_vms
    (repo / "lock.main").unlink()
    (repo / "lock.main").mkdir()
    assert_one_line_error(
        repofs("ingest", repo, "--vm", "web", f"d0={web}", check=False), "lock.main"
    )
    assert_one_line_error(repofs("verify", repo, check=False), "lock.main")
    (repo / "lock.main").rmdir()
    (repo / "lock.gc").unlink(missing_ok=True)
    (repo / "lock.gc").mkdir()
    assert_one_line_error(repofs("gc", repo, check=False), "lock.gc")
    (repo / "lock.gc").rmdir()

    shutil.move(repo / "packs", repo.parent / "packs.away")
    (repo / "packs").write_bytes(b"")
    assert_one_line_error(repofs("verify", repo, check=False), "packs")
    assert_one_line_error(repofs("rebuild-index", repo, check=False), "packs")
    (repo / "packs").unlink()
    shutil.move(repo.parent / "packs.away", repo / "packs")

    config = (repo / "config.json").read_bytes()
    (repo / "config.json").unlink()
    os.mkfifo(repo / "config.json")  # would hang every command on open
    assert_one_line_error(repofs("list", repo, check=False, timeout=30), "not a regular file")
    (repo / "config.json").unlink()
    (repo / "config.json").write_bytes(config)

    assert_one_line_error(
        repofs("init", repo / "index" / "sub", check=False), "inside the repository"
    )
    assert not (repo / "index" / "sub").exists()
    repofs("verify", repo)


def test_a_limited_address_space_still_opens_the_index(
    tmp_path: Path, two_vms: tuple[Path, Path]
) -> None:
    """Under ``ulimit -v`` of 4 GB the index's 64 GiB map could not be mapped at all."""
    repo, web = two_vms
    limit = ["prlimit", "--as=4000000000", "--"]
    for args in (["list", str(repo)], ["ingest", str(repo), "--vm", "web", f"d0={web}"]):
        subprocess.run(limit + cli_argv(*args), check=True, capture_output=True, env=cli_env())
    assert len(rp_ids(repo, "web")) == 2
    repofs("verify", repo)


def _breaks_only_the_objects_table(raw: bytes, page: int, scratch: Path) -> bool:
    """Whether zeroing ``page``'s type flags leaves the index openable but its objects
    table unreadable: damage that only a lookup in the middle of a command meets."""
    import lmdb

    from repofs.store.index import DATABASES

    bad = bytearray(raw)
    bad[page * 4096 + 10 : page * 4096 + 12] = b"\0\0"
    scratch.mkdir(exist_ok=True)
    (scratch / "data.mdb").write_bytes(bytes(bad))
    env = lmdb.open(str(scratch), readonly=True, lock=False, max_dbs=len(DATABASES) + 2)
    try:
        dbs = {name: env.open_db(name.encode(), create=False) for name in DATABASES}
        with env.begin() as txn:
            for name in ("rps", "vms", "packs", "seqs"):
                list(txn.cursor(dbs[name]))
    except lmdb.Error:
        env.close()
        return False
    try:
        with env.begin() as txn:
            list(txn.cursor(dbs["objects"]))
    except lmdb.Error:
        return True
    finally:
        env.close()
    return False


def test_damage_deep_in_the_index_is_one_line_not_a_traceback(
    tmp_path: Path, two_vms: tuple[Path, Path]
) -> None:
    """LMDB finds a damaged page only when a lookup walks into it, in the middle of gc or
    stats: a one-line error pointing to rebuild-index, and rebuild-index recovers."""
    repo, _web = two_vms
    before = rp_ids(repo)
    data = repo / "index" / "data.mdb"
    raw = data.read_bytes()
    page = next(
        p
        for p in range(2, len(raw) // 4096)
        if _breaks_only_the_objects_table(raw, p, tmp_path / "probe")
    )
    bad = bytearray(raw)
    bad[page * 4096 + 10 : page * 4096 + 12] = b"\0\0"
    data.write_bytes(bytes(bad))
    repofs("list", repo)
    for cmd in ("gc", "stats"):
        assert_one_line_error(repofs(cmd, repo, check=False), "rebuild-index")
    assert repofs("verify", repo, check=False).returncode != 0
    repofs("rebuild-index", repo)
    assert rp_ids(repo) == before
    repofs("verify", repo)


def test_a_clock_set_back_does_not_make_an_older_backup_the_latest(tmp_path: Path) -> None:
    """A restore point taken after the clock went back a day is still the newest id, so the
    next changed-block ingest builds on it and stores the right bytes."""
    repo = new_repo(tmp_path / "repo")
    img = make_image(tmp_path / "d.img", 2 * MiB, [(0, noise(2 * MiB, 1))])
    now = 1_800_000_000.0
    first = ingest_here(repo, "v", {"d0": img}, now=now)
    with open(img, "r+b") as f:
        f.write(noise(64 * 1024, 2))  # changed, and no changed-block list says so
    second = ingest_here(repo, "v", {"d0": img}, now=now - 86400)
    assert rp_ids(repo, "v") == [first, second] and second > first
    with open(img, "r+b") as f:
        f.seek(MiB)
        f.write(noise(64 * 1024, 3))
    third = ingest_here(repo, "v", {"d0": img}, changed={"d0": [(MiB, 64 * 1024)]}, now=now - 86000)
    assert rp_ids(repo, "v")[-1] == third
    assert read_disk(repo, "v", third) == img.read_bytes()


def test_init_starts_over_where_an_init_was_killed(tmp_path: Path) -> None:
    """config.json is written last: a directory holding only what init makes before it
    never held a backup, and init may start over there.  Anything more is refused."""
    repo = tmp_path / "repo"
    repofs("init", repo)
    (repo / "config.json").unlink()  # as if init had been killed just before writing it
    assert_one_line_error(repofs("list", repo, check=False), "config.json")
    repofs("init", repo)
    repofs("list", repo)
    (repo / "config.json").unlink()
    (repo / "notes.txt").write_text("mine\n")
    assert_one_line_error(repofs("init", repo, check=False), "not empty")
    assert (repo / "notes.txt").read_text() == "mine\n"


def test_a_killed_rebuild_leaves_nothing_for_long(two_vms: tuple[Path, Path]) -> None:
    """The half-built index.new of a rebuild-index killed with -9: verify mentions it and
    gc, which excludes rebuild-index in its sweep, removes it."""
    repo, _web = two_vms
    (repo / "index.new").mkdir()
    (repo / "index.new" / "data.mdb").write_bytes(b"\0" * 8192)
    assert "index.new/ is left by an interrupted rebuild-index" in repofs("verify", repo).stdout
    repofs("gc", repo)
    assert not (repo / "index.new").exists()
    repofs("verify", repo)
