"""REPOFS_S3_STATS: a command on a bucket reports its requests and bytes when it exits."""

from __future__ import annotations

import json
import os
from pathlib import Path

from tests.support.helpers import repofs


def _lines(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


class TestStatsFile:
    def test_ingest_appends_its_requests_and_bytes(
        self, tmp_path: Path, s3_url: str, s3_env: dict[str, str]
    ) -> None:
        """Each command appends one line; the ingest's counts its PUTs and the bytes uploaded."""
        stats = tmp_path / "stats.jsonl"
        env = {**s3_env, "REPOFS_S3_STATS": str(stats), "REPOFS_CACHE_DIR": str(tmp_path / "c")}
        disk = tmp_path / "disk.img"
        disk.write_bytes(os.urandom(1 << 20))
        repofs("init", s3_url, env=env)
        repofs("ingest", s3_url, "--vm", "vm1", f"disk0={disk}", env=env)
        init, ingest = _lines(stats)
        assert init["command"] == ["init"] and ingest["command"] == ["ingest"]
        counts = ingest["counts"]
        assert isinstance(counts, dict)
        # a lease, at least one pack and the commit object; the random megabyte is uploaded
        assert counts["PUT"] >= 3 and counts["LIST"] >= 1
        assert counts["bytes_up"] > 1 << 20

    def test_unwritable_stats_file_does_not_fail_the_command(
        self, tmp_path: Path, s3_url: str, s3_env: dict[str, str]
    ) -> None:
        """Statistics are a by-product: a path that cannot be written leaves the exit status 0."""
        env = {
            **s3_env,
            "REPOFS_S3_STATS": str(tmp_path / "missing-dir" / "stats.jsonl"),
            "REPOFS_CACHE_DIR": str(tmp_path / "c"),
        }
        proc = repofs("init", s3_url, env=env)
        assert proc.returncode == 0 and proc.stderr.count("Traceback") == 0

    def test_local_repository_writes_nothing(self, tmp_path: Path) -> None:
        """Without a bucket there is nothing to count, and no file appears."""
        stats = tmp_path / "stats.jsonl"
        repofs("init", tmp_path / "repo", env={"REPOFS_S3_STATS": str(stats)})
        assert not stats.exists()
