"""tools/s3_baseline_read reads every byte under a prefix and reports what it measured."""

from __future__ import annotations

import json
import os
import subprocess
from typing import Any

from tests.support.helpers import REPO_ROOT
from tests.support.s3server import S3Server

MiB = 1 << 20


def _run(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(REPO_ROOT / "tools" / "s3_baseline_read"), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


class TestS3BaselineRead:
    def test_sequential_and_random_reads(
        self, s3_server: S3Server, s3_bucket: str, s3_env: dict[str, str]
    ) -> None:
        """Every object under the prefix is read in parts; --random4k reports p50/p99."""
        s3: Any = s3_server.client()
        sizes = [20 * MiB + 5, 8 * MiB, 3]
        for i, size in enumerate(sizes):
            s3.put_object(Bucket=s3_bucket, Key=f"repo/packs/0{i}/p.pack", Body=os.urandom(size))
        s3.put_object(Bucket=s3_bucket, Key="elsewhere", Body=b"not under the prefix")

        proc = _run(s3_env, "--bucket", s3_bucket, "--prefix", "repo/", "--threads", "4")
        assert proc.returncode == 0, proc.stderr
        result = json.loads(proc.stdout)
        assert result["bytes"] == sum(sizes)
        assert result["gets"] == 3 + 1 + 1  # 8 MiB parts
        assert result["MB_per_s"] > 0

        proc = _run(s3_env, "--bucket", s3_bucket, "--prefix", "repo/", "--random4k", "50")
        assert proc.returncode == 0, proc.stderr
        result = json.loads(proc.stdout)
        assert result["gets"] == 50
        assert 0 < result["p50_ms"] <= result["p99_ms"]

    def test_empty_prefix_is_a_one_line_error(
        self, s3_bucket: str, s3_env: dict[str, str]
    ) -> None:
        """Nothing under the prefix: exit 1 with one line saying so."""
        proc = _run(s3_env, "--bucket", s3_bucket, "--prefix", "nothing/")
        assert proc.returncode == 1
        assert proc.stderr.strip() == (
            f"s3_baseline_read: error: no objects under s3://{s3_bucket}/nothing/"
        )
