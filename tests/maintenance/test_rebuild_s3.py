"""rebuild-index on a bucket: this host's cache built again from the log, or from the packs too."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from repofs.store.records import RECORD_HEADER_SIZE
from tests.maintenance.s3maint import (
    S3Repo,
    chunk_in_pack,
    new_s3_repo,
    rp_seqs,
    second_host,
    write_checkpoint,
)
from tests.support.helpers import spawn
from tests.support.maint import kill9, wait_for_line
from tests.support.s3server import S3Server


@pytest.fixture
def s3repo(s3_server: S3Server, s3_bucket: str, s3_env: dict[str, str], tmp_path: Path) -> S3Repo:
    """A bucket repository with restore points of two VMs."""
    r = new_s3_repo(s3_server, s3_bucket, s3_env, tmp_path)
    r.ingest("web")
    r.ingest("db")
    with open(r.image, "r+b") as f:
        f.write(b"\x11" * 65536)
    r.ingest("web")
    return r


def rebuild(r: S3Repo, *extra: str, code: int = 0) -> dict[str, object]:
    proc = r.run("rebuild-index", r.url, "--json", *extra, check=False)
    assert proc.returncode == code, proc.stdout + proc.stderr
    return json.loads(proc.stdout)


class TestFromTheLog:
    def test_after_the_cache_is_deleted(self, s3repo: S3Repo) -> None:
        """Deleting the cache loses nothing: the same restore points and inode numbers come back."""
        before = rp_seqs(s3repo)
        shutil.rmtree(s3repo.cache)
        doc = rebuild(s3repo)
        assert doc["mode"] == "log" and doc["restore_points"] == 3 and doc["vms"] == 2, doc
        assert rp_seqs(s3repo) == before
        s3repo.run("verify", s3repo.url)

    def test_after_the_cache_index_is_damaged(self, s3repo: S3Repo) -> None:
        """A cache whose data.mdb is garbage is rebuilt; verify then passes again."""
        before = rp_seqs(s3repo)
        data = s3repo.cache / "index" / "data.mdb"
        data.write_bytes(b"\xde\xad" * 8192)
        assert s3repo.run("list", s3repo.url, check=False).returncode != 0
        rebuild(s3repo)
        assert rp_seqs(s3repo) == before
        s3repo.run("verify", s3repo.url)

    def test_damaged_commit_is_named_and_left_out(self, s3repo: S3Repo) -> None:
        """A commit object that does not decode is named; the other restore points come back."""
        commits = [n for n, _size in s3repo.keys("log/c-")]
        s3repo.flip(commits[0], 20)
        doc = rebuild(s3repo)
        assert doc["restore_points"] == 2, doc
        assert any(commits[0] in line for line in doc["damaged"]), doc  # type: ignore[attr-defined]

    def test_damaged_newest_checkpoint_falls_back(self, s3repo: S3Repo, tmp_path: Path) -> None:
        """The newest checkpoint does not decode: the one before it and the log bring all back."""
        write_checkpoint(s3repo)
        s3repo.ingest("db")
        newest = write_checkpoint(s3repo)
        before = rp_seqs(s3repo)
        s3repo.flip(newest, 30)
        code, doc = s3repo.verify_json("--sizes-only")
        assert code == 5, doc
        assert any(p["subject"] == f"log object {newest}" for p in doc["problems"]), doc
        other = second_host(s3repo, tmp_path)
        rebuilt = rebuild(other)
        assert rebuilt["checkpoint"] != newest and rebuilt["checkpoint"] is not None, rebuilt
        assert rebuilt["restore_points"] == 4, rebuilt
        assert any(newest in line for line in rebuilt["damaged"]), rebuilt  # type: ignore[attr-defined]
        assert rp_seqs(other) == before


class TestScanPacks:
    def test_equals_the_log_rebuild(self, s3repo: S3Repo) -> None:
        """--scan-packs brings back exactly what the log rebuild does, inode numbers included."""
        before = rp_seqs(s3repo)
        doc = rebuild(s3repo, "--scan-packs")
        assert doc["mode"] == "scan" and doc["dropped_objects"] == 0 and not doc["damaged"], doc
        assert doc["packs"] >= 1 and doc["bytes_scanned"] > 0, doc
        assert rp_seqs(s3repo) == before
        s3repo.run("verify", s3repo.url)

    def test_damaged_record_is_dropped(self, s3repo: S3Repo) -> None:
        """A flipped byte in a chunk: the record is dropped, its restore points named incomplete."""
        name, offset, stored = chunk_in_pack(s3repo)
        s3repo.flip(name, offset + RECORD_HEADER_SIZE + stored // 2)
        doc = rebuild(s3repo, "--scan-packs", code=5)
        assert doc["dropped_objects"] == 1, doc
        assert doc["incomplete"] and doc["damaged"], doc
        assert rebuild(s3repo)["restore_points"] == 3  # the log rebuild does not drop it

    def test_uncommitted_ingest_does_not_come_back(
        self, s3repo: S3Repo, tmp_path: Path
    ) -> None:
        """An ingest killed after its packs were uploaded, before its commit, stays invisible."""
        before = rp_seqs(s3repo)
        packs_before = {n for n, _size in s3repo.keys("packs/")}
        img = tmp_path / "new.img"
        img.write_bytes(b"\x77" * (1 << 20))
        proc = spawn(
            "ingest",
            s3repo.url,
            "--vm",
            "ghost",
            f"d0={img}",
            env={**s3repo.env, "REPOFS_TEST_PAUSE_BEFORE_COMMIT": "60"},
        )
        try:
            wait_for_line(proc, "pausing before commit")
        finally:
            kill9(proc)
        assert {n for n, _size in s3repo.keys("packs/")} - packs_before  # its packs are there
        doc = rebuild(s3repo, "--scan-packs")
        assert any("named by no commit" in line for line in doc["skipped_packs"]), doc  # type: ignore[attr-defined]
        assert rp_seqs(s3repo) == before
        listed = s3repo.run("list", s3repo.url, "--json").stdout
        assert "ghost" not in listed
