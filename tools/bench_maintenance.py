#!/usr/bin/env python3
"""Figures for docs/maintenance.md: verify throughput and gc mark cost.  Not a test.

1. ``verify`` MB/s beside a plain sequential read of the same pack files
   (``cat packs > /dev/null``), page cache dropped before each run when
   permitted (``echo 3 > /proc/sys/vm/drop_caches``, root only).
2. gc mark time for an 8 GiB sparse disk with 10 and with 100 restore
   points: it grows with the number of *distinct* map pages, not with
   restore points x disk size.  A naive walk (every restore point's whole
   map, no visited set) is timed beside it.

Run from the repository root::

    PYTHONPATH=. python tools/bench_maintenance.py [--dir DIR] [--runs N] [--verify-gib G]
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MiB = 1 << 20
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from repofs.gc import Marker  # noqa: E402 - after the path set-up above
from repofs.mapwalk import MapWalker  # noqa: E402
from repofs.records import RecordType  # noqa: E402
from repofs.repository import Repository  # noqa: E402


def drop_caches() -> bool:
    subprocess.run(["sync"], check=False)
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def cli(*args: str | os.PathLike[str]) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    subprocess.run(
        [sys.executable, "-m", "repofs", *map(str, args)],
        check=True,
        env=env,
        stdout=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
    )


def make_vm_like_image(path: Path, size: int, seed: int) -> None:
    """Half incompressible, half compressible (text-like) data, so zstd work is measured too."""
    rng = random.Random(seed)
    letters = b"abcdefghijklmnopqrstuvwxyz"
    words = [bytes(rng.choices(letters, k=rng.randint(2, 9))) for _ in range(500)]
    with open(path, "wb") as f:
        for k in range(size // MiB):
            if k % 2:
                f.write(rng.randbytes(MiB))
            else:
                buf = bytearray()
                while len(buf) < MiB:
                    buf += rng.choice(words) + b" "
                f.write(bytes(buf[:MiB]))


def bench_verify(work: Path, gib: int, runs: int) -> dict[str, object]:
    repo = work / "verify-repo"
    img = work / "vm.img"
    make_vm_like_image(img, gib * 1024 * MiB, 1)
    cli("init", repo)
    cli("ingest", repo, "--vm", "bench", f"d0={img}")
    img.unlink()
    packs = sorted((repo / "packs").glob("??/*.pack"))
    total = sum(p.stat().st_size for p in packs)
    cat_s, verify_s = [], []
    cold = True
    for _ in range(runs):
        cold &= drop_caches()
        t0 = time.monotonic()
        subprocess.run(f"cat {' '.join(map(str, packs))} > /dev/null", shell=True, check=True)
        cat_s.append(time.monotonic() - t0)
        cold &= drop_caches()
        t0 = time.monotonic()
        cli("verify", repo)
        verify_s.append(time.monotonic() - t0)
    shutil.rmtree(repo)
    return {
        "pack_bytes": total,
        "cold_cache": cold,
        "cat_mb_s": total / statistics.median(cat_s) / 1e6,
        "verify_mb_s": total / statistics.median(verify_s) / 1e6,
        "cat_s": statistics.median(cat_s),
        "verify_s": statistics.median(verify_s),
    }


def bench_mark(work: Path, runs: int) -> dict[str, object]:
    """100 restore points of an 8 GiB sparse disk, each changing two chunks."""
    from ingest.detect import open_source
    from ingest.pipeline import DiskRequest, Ingest

    repo_path = work / "mark-repo"
    Repository.init(str(repo_path), 64 * 1024, "zstd:3").close()
    img = work / "sparse.img"
    size = 8 * 1024 * MiB
    rng = random.Random(7)
    with open(img, "wb") as f:
        f.truncate(size)
        for page in range(128):  # one allocated chunk under every level-0 page
            f.seek(page * 64 * MiB)
            f.write(rng.randbytes(64 * 1024))
    out: dict[str, object] = {"disk_bytes": size}
    repo = Repository.open(str(repo_path))
    try:
        for n in range(1, 101):
            with open(img, "r+b") as f:
                for _ in range(2):
                    f.seek(rng.randrange(128) * 64 * MiB)
                    f.write(rng.randbytes(64 * 1024))
            src = open_source(str(img))
            try:
                Ingest(
                    repo,
                    "vm",
                    [DiskRequest("d0", src)],
                    [],
                    parent=repo.latest("vm"),
                    progress=False,
                ).run(1_700_000_000.0 + n)
            finally:
                src.close()
            if n in (10, 100):
                out[n] = _time_marks(repo, runs)
    finally:
        repo.close()
    shutil.rmtree(repo_path)
    img.unlink()
    return out


def _time_marks(repo: Repository, runs: int) -> dict[str, float]:
    rps = repo.restore_points()
    times, naive = [], []
    pages = loaded = 0
    for _ in range(runs):
        marker = Marker(repo)
        t0 = time.monotonic()
        marker.mark_all()
        times.append(time.monotonic() - t0)
        loaded = marker.walker.pages_loaded
        t0 = time.monotonic()
        for rp in rps:  # what mark would cost without the visited set
            walker = MapWalker(
                repo.config.page_refs, lambda d: repo.read_object(RecordType.PAGE, d)
            )
            for disk in rp.disks:
                walker.walk(disk.map, lambda page, first: None)
            pages += walker.pages_loaded
        naive.append(time.monotonic() - t0)
    return {
        "restore_points": len(rps),
        "distinct_pages_loaded": loaded,
        "naive_pages_loaded": pages // runs,
        "mark_s": statistics.median(times),
        "naive_walk_s": statistics.median(naive),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument(
        "--dir", default=None, help="scratch directory (default: a new one in /var/tmp)"
    )
    ap.add_argument("--runs", type=int, default=3, help="runs per figure; medians are reported")
    ap.add_argument("--verify-gib", type=int, default=2, help="size of the verify test image")
    args = ap.parse_args()
    work = Path(args.dir or tempfile.mkdtemp(prefix="repofs-bench-", dir="/var/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        v = bench_verify(work, args.verify_gib, args.runs)
        cache = "dropped" if v["cold_cache"] else "WARM (could not drop)"
        print(
            f"verify: {v['pack_bytes'] / MiB:.0f} MiB of packs, cache {cache}; "
            f"medians of {args.runs}"
        )
        print(f"  cat packs > /dev/null : {v['cat_s']:.2f} s  {v['cat_mb_s']:.0f} MB/s")
        print(
            f"  repofs verify         : {v['verify_s']:.2f} s  {v['verify_mb_s']:.0f} MB/s "
            f"({100 * float(v['verify_mb_s']) / float(v['cat_mb_s']):.0f}% of cat)"
        )
        m = bench_mark(work, args.runs)
        print(
            "gc mark: 8 GiB sparse disk, two chunks changed per restore point; "
            f"medians of {args.runs}"
        )
        for n in (10, 100):
            r = m[n]
            assert isinstance(r, dict)
            print(
                f"  {r['restore_points']:>3} restore points: mark {r['mark_s'] * 1000:.1f} ms, "
                f"{r['distinct_pages_loaded']} distinct pages; naive walk "
                f"{r['naive_walk_s'] * 1000:.1f} ms, {r['naive_pages_loaded']} pages"
            )
    finally:
        if args.dir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
