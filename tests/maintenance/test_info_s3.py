"""info and stats on a bucket: its object counts and this host's cache, as text and JSON."""

from __future__ import annotations

import json
from pathlib import Path

from tests.maintenance.s3maint import new_s3_repo
from tests.support.s3server import S3Server


class TestInfoAndStats:
    def test_info_and_stats_json(
        self, s3_server: S3Server, s3_bucket: str, s3_env: dict[str, str], tmp_path: Path
    ) -> None:
        """info --json counts packs, log objects, checkpoints and leases; stats --json works."""
        r = new_s3_repo(s3_server, s3_bucket, s3_env, tmp_path)
        r.ingest("web")
        r.ingest("db")
        doc = json.loads(r.run("info", r.url, "--json").stdout)
        assert doc["url"] == r.url and doc["endpoint"] == s3_server.endpoint
        assert doc["cache_dir"] == str(r.cache) and doc["cache_bytes"] > 0
        assert doc["vms"] == 2 and doc["restore_points"] == 2
        packs = r.keys("packs/")
        assert doc["pack_count"] == len(packs) and doc["pack_bytes"] == sum(s for _n, s in packs)
        assert doc["log_objects"] == doc["commit_objects"] == 2
        assert doc["checkpoints"] == 0 and doc["leases"] == []
        assert doc["encryption"] == "aes-256-gcm" and doc["key"] == "passphrase"
        text = r.run("info", r.url).stdout
        assert "pack objects" in text and f"{r.cache}" in text and "2 commits" in text
        stats = json.loads(r.run("stats", r.url, "--json").stdout)
        assert stats["vms"] == 2 and stats["restore_points"] == 2 and stats["chunk_count"] > 0
        assert stats["pack_count"] == len(packs)
        assert "dedup ratio" in r.run("stats", r.url).stdout
