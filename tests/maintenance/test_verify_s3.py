"""verify on a bucket: the full re-hash and --sizes-only, against a real S3 server."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from repofs.store.records import RECORD_HEADER_SIZE
from tests.maintenance.s3maint import S3Repo, chunk_in_pack, new_s3_repo, second_host
from tests.support.helpers import assert_one_line_error
from tests.support.s3server import S3Server


@pytest.fixture
def s3repo(s3_server: S3Server, s3_bucket: str, s3_env: dict[str, str], tmp_path: Path) -> S3Repo:
    """A bucket repository with two restore points of VM web."""
    r = new_s3_repo(s3_server, s3_bucket, s3_env, tmp_path)
    r.ingest()
    with open(r.image, "r+b") as f:
        f.seek(3 << 20)
        f.write(b"\x5a" * 65536)
    r.ingest()
    return r


class TestCleanBucket:
    def test_full_verify_passes(self, s3repo: S3Repo) -> None:
        """A healthy bucket re-hashes cleanly and says how many log objects it decoded."""
        proc = s3repo.run("verify", s3repo.url)
        assert "no problems found" in proc.stdout, proc.stdout
        assert re.search(r"checked 2 restore point\(s\) of 1 VM\(s\)", proc.stdout), proc.stdout
        assert "2 log object(s) decoded" in proc.stdout, proc.stdout
        some = s3repo.run("verify", s3repo.url, "--vm", "web", "--sample", "50")
        assert "no problems found" in some.stdout, some.stdout

    def test_sizes_only_passes(self, s3repo: S3Repo) -> None:
        """--sizes-only passes on a healthy bucket and reads no byte of any pack."""
        code, doc = s3repo.verify_json("--sizes-only")
        assert code == 0 and doc["ok"], doc
        assert doc["mode"] == "sizes" and doc["objects_checked"] == 0
        assert doc["packs"] >= 1 and doc["log_objects"] == 2 and doc["restore_points"] == 2
        assert doc["requests"]["bytes_down"] < 100_000, doc  # the log, and no pack

    def test_full_verify_reads_each_pack_in_few_gets(self, s3repo: S3Repo) -> None:
        """The full verify fetches large windows: GETs stay near one per pack, never per record."""
        code, doc = s3repo.verify_json()
        assert code == 0, doc
        gets = doc["requests"]["GET"] - doc["log_objects"] - 2  # config.json, the key
        assert 0 < gets <= 2 * doc["packs"], doc
        assert doc["objects_checked"] > 4 * gets, doc

    def test_uncommitted_pack_is_a_warning(self, s3repo: S3Repo) -> None:
        """A pack no commit names (an ingest killed before its commit) is a warning, not damage."""
        s3repo.put("packs/ab/" + "ab" * 16 + ".pack", b"x" * 100)
        for extra in ((), ("--sizes-only",)):
            code, doc = s3repo.verify_json(*extra)
            assert code == 0, doc
            assert any("named by no commit" in w for w in doc["warnings"]), doc


class TestDamagedPack:
    def test_flipped_byte_is_named_by_the_full_verify(self, s3repo: S3Repo) -> None:
        """A flipped byte in a chunk: exit 5, naming VM, restore point, disk and byte range."""
        name, offset, stored = chunk_in_pack(s3repo)
        s3repo.flip(name, offset + RECORD_HEADER_SIZE + stored // 2)
        proc = s3repo.run("verify", s3repo.url, check=False)
        assert proc.returncode == 5, proc.stdout + proc.stderr
        assert "PROBLEM chunk" in proc.stdout, proc.stdout
        assert re.search(r"affects web/\S+ d0-flat\.vmdk bytes \d+-\d+", proc.stdout), proc.stdout

    def test_flipped_byte_passes_sizes_only(self, s3repo: S3Repo) -> None:
        """--sizes-only does not see a flipped byte: the size is unchanged (documented)."""
        name, offset, stored = chunk_in_pack(s3repo)
        s3repo.flip(name, offset + RECORD_HEADER_SIZE + stored // 2)
        code, doc = s3repo.verify_json("--sizes-only")
        assert code == 0 and doc["ok"], doc

    def test_deleted_pack_is_named_by_both_modes(self, s3repo: S3Repo) -> None:
        """A pack object gone from the bucket is named by the full verify and by --sizes-only."""
        name, _offset, _stored = chunk_in_pack(s3repo)
        s3repo.delete(name)
        pack = name.rsplit("/", 1)[1].removesuffix(".pack")
        code, doc = s3repo.verify_json("--sizes-only")
        assert code == 5, doc
        assert any(p["subject"] == f"pack {pack}" and p["message"] == "is missing"
                   for p in doc["problems"]), doc
        proc = s3repo.run("verify", s3repo.url, check=False)
        assert proc.returncode == 5, proc.stdout + proc.stderr
        assert f"PROBLEM pack {pack}: is missing" in proc.stdout, proc.stdout
        assert re.search(r"affects web/\S+ d0-flat\.vmdk bytes \d+-\d+", proc.stdout), proc.stdout

    def test_truncated_pack_is_named_by_sizes_only(self, s3repo: S3Repo) -> None:
        """A pack object shorter than the index says is named without reading it."""
        name, _offset, _stored = chunk_in_pack(s3repo)
        s3repo.put(name, s3repo.get(name)[:-100])
        code, doc = s3repo.verify_json("--sizes-only")
        assert code == 5, doc
        assert any("is truncated" in p["message"] for p in doc["problems"]), doc


class TestDamagedLog:
    def test_damaged_commit_is_named(self, s3repo: S3Repo) -> None:
        """A commit object that does not decode is named by both modes, with its restore point."""
        commits = [n for n, _size in s3repo.keys("log/c-")]
        assert len(commits) == 2
        s3repo.flip(commits[0], 20)
        for extra in ((), ("--sizes-only",)):
            code, doc = s3repo.verify_json(*extra)
            assert code == 5, doc
            (problem,) = [p for p in doc["problems"] if p["subject"] == f"log object {commits[0]}"]
            assert "a commit that does not decode" in problem["message"], problem
            assert re.match(r"web/\S+: still listed by this host's cache", problem["affects"][0])

    def test_damaged_commit_seen_from_a_fresh_host(self, s3repo: S3Repo, tmp_path: Path) -> None:
        """A fresh cache never saw the damaged commit: verify still names the object."""
        commits = [n for n, _size in s3repo.keys("log/c-")]
        s3repo.flip(commits[0], 20)
        other = second_host(s3repo, tmp_path)
        code, doc = other.verify_json("--sizes-only")
        assert code == 5, doc
        assert doc["restore_points"] == 1, doc
        assert any(p["subject"] == f"log object {commits[0]}" for p in doc["problems"]), doc


class TestCache:
    def test_damaged_cache_says_rebuild(self, s3repo: S3Repo) -> None:
        """An unreadable cache is one problem pointing at rebuild-index, not a traceback."""
        (s3repo.cache / "index" / "data.mdb").write_bytes(b"\0" * 4096)
        code, doc = s3repo.verify_json()
        assert code == 5, doc
        assert "rebuild-index" in doc["problems"][0]["message"], doc

    def test_sizes_only_refuses_vm(self, s3repo: S3Repo) -> None:
        """--sizes-only checks every pack: --vm with it is a usage error."""
        proc = s3repo.run("verify", s3repo.url, "--sizes-only", "--vm", "web", check=False)
        assert_one_line_error(proc, "--sizes-only")


class TestSizesOnlyLocal:
    def test_local_directory(self, tmp_path: Path) -> None:
        """--sizes-only works on a directory too: a truncated pack is named, nothing is read."""
        from tests.support.helpers import make_image, repofs
        from tests.support.maint import MiB, ingest_here, new_repo, noise, pack_files

        repo = new_repo(tmp_path / "repo")
        img = make_image(tmp_path / "web.img", 4 * MiB, [(0, noise(2 * MiB, 1))])
        ingest_here(repo, "web", {"d0": img}, now=1_700_000_000)
        ok = repofs("verify", repo, "--sizes-only")
        assert "no problems found" in ok.stdout and "exist with their sizes" in ok.stdout
        biggest = max(pack_files(repo), key=lambda p: p.stat().st_size)
        with open(biggest, "r+b") as f:
            f.truncate(biggest.stat().st_size - 10)
        proc = repofs("verify", repo, "--sizes-only", check=False)
        assert proc.returncode == 5, proc.stdout
        assert f"PROBLEM pack {biggest.stem}: is truncated" in proc.stdout, proc.stdout
