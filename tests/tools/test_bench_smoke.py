"""The benchmark harness runs end to end, so it cannot rot (no peers, no timing checks)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists("/dev/fuse") or shutil.which("fusermount3") is None,
    reason="the benchmark needs root (loop devices, drop_caches) and FUSE",
)


class TestBenchSmoke:
    def test_quick_mode_writes_the_report(self, tmp_path: Path) -> None:
        """``tools/bench --quick --no-peers`` on a tiny corpus fills the report and raw results."""
        doc = tmp_path / "performance.md"
        doc.write_text("# Performance\n\nprose kept\n\n<!-- bench:begin -->\nold\n"
                       "<!-- bench:end -->\n\nmore prose\n")
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        proc = subprocess.run(
            [sys.executable, str(ROOT / "tools" / "bench.py"), "--quick", "--no-peers",
             "--out", str(tmp_path / "out"), "--doc", str(doc), "--no-plot",
             "--size", "64M", "--data", "12M", "--scale-rps", "5", "--sweep", "64K"],
            env=env, capture_output=True, text=True, timeout=180,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        text = doc.read_text()
        assert "prose kept" in text and "more prose" in text and "\nold\n" not in text
        for figure in ("full ingest, s", "incremental day 1", "sequential read through the mount",
                       "random 4 KiB read p99", "mount ready", "pass-through"):
            assert figure in text, figure
        results = json.loads((tmp_path / "out" / "results.json").read_text())
        for key in ("repofs.full_s", "repofs.seq_direct_MBps", "repofs.seq_dio_mount_MBps",
                    "passthrough_direct_cold_MBps", "limit_read_MBps",
                    "limit_read_hashzstd_MBps"):
            assert results["samples"][key], key
        assert "the read with hash+compress" in text and "O_DIRECT, read-ahead threads" in text
        assert not list((tmp_path / "out").glob("work")), "work directory left behind"
        # --limits-only: the same corpus (cached), the limits beside one full ingest
        proc = subprocess.run(
            [sys.executable, str(ROOT / "tools" / "bench.py"), "--limits-only", "--quick",
             "--out", str(tmp_path / "out"), "--size", "64M", "--data", "12M"],
            env=env, capture_output=True, text=True, timeout=180,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "x the read with hash+compress" in proc.stderr, proc.stderr
        limits = json.loads((tmp_path / "out" / "results-limits.json").read_text())
        assert limits["samples"]["repofs.full_s"] and limits["samples"]["limit_read_MBps"]

    @pytest.mark.slow
    def test_s3_scenario_writes_its_section(self, tmp_path: Path) -> None:
        """``tools/bench --s3 --quick`` runs every step on its own SeaweedFS and fills its block."""
        doc = tmp_path / "performance.md"
        doc.write_text("# Performance\n\n<!-- bench:begin -->\nkept\n<!-- bench:end -->\n")
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        proc = subprocess.run(
            [sys.executable, str(ROOT / "tools" / "bench.py"), "--s3", "--quick",
             "--out", str(tmp_path / "out"), "--doc", str(doc), "--size", "64M", "--data", "12M",
             "--scale-rps", "5"],
            env=env, capture_output=True, text=True, timeout=300,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        text = doc.read_text()
        assert "\nkept\n" in text and "## Object storage" in text
        for figure in ("bucket / local ingest speed", "PUTs per GiB", "mount's download rate",
                       "random 4 KiB read through the mount", "30 ms RTT proxy",
                       "5 restore points: `repofs mount` ready", "Per TB"):
            assert figure in text, figure
        results = json.loads((tmp_path / "out" / "results-s3.json").read_text())
        assert results["samples"]["s3.full_PUT"][0] >= 3
        assert results["samples"]["s3.full_bytes_up"][0] > 0
        assert results["summary"]["per_TB_ingested"]["PUT"] > 0
        assert not list((tmp_path / "out").glob("work")), "work directory left behind"

    def test_cbt_reads_tool_reads_the_chunks_a_list_touches(self, tmp_path: Path) -> None:
        """``tools/bench_cbt_reads.py`` rounds the list out to whole chunks and reads them."""
        img = tmp_path / "d.img"
        img.write_bytes(os.urandom(2 << 20))
        cbt = tmp_path / "d.cbt.json"
        cbt.write_text(json.dumps({"block_size": 65536,
                                   "extents": [[0, 65536], [(1 << 20) + 65536, 131072]]}))
        proc = subprocess.run(
            [sys.executable, str(ROOT / "tools" / "bench_cbt_reads.py"), str(img), str(cbt),
             "--threads", "1,2", "--runs", "1"],
            env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
            timeout=60,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        # chunk 0, and chunks 8-9 for the extent that straddles them: 384 KiB in two reads
        assert proc.stdout.startswith("2 reads, 0.4 MiB, chunk 128K"), proc.stdout
        assert "threads  1:" in proc.stdout and "threads  2:" in proc.stdout

    def test_compression_tool_counts_distinct_nonzero_chunks(self, tmp_path: Path) -> None:
        """``tools/bench_compression.py`` samples distinct data chunks and reports each level."""
        img = tmp_path / "d.img"
        text = b"the same words over and over " * 4520  # about 128 KiB of compressible data
        with open(img, "wb") as f:
            f.write(text[:131072] * 2)  # two equal chunks: one distinct
            f.write(os.urandom(131072))
            f.write(bytes(131072))  # a zero chunk: never stored, not sampled
        proc = subprocess.run(
            [sys.executable, str(ROOT / "tools" / "bench_compression.py"), str(img),
             "--levels", "1,3", "--every", "1"],
            env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
            timeout=60,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        lines = proc.stdout.splitlines()
        assert lines[0] == "2 distinct chunks of 128K, 0 MiB", proc.stdout
        assert lines[1].startswith("zstd level  1:") and lines[2].startswith("zstd level  3:")
        # the random chunk is stored whole, the text one shrinks to almost nothing
        assert 50.0 < float(lines[2].split(":")[1].split("%")[0]) < 51.0, proc.stdout
