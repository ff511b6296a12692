#!/usr/bin/env python3
"""Figures for docs/maintenance.md: verify throughput and gc mark cost.  Not a test.

1. ``verify`` MB/s beside a plain sequential read of the same pack files
   (``cat packs > /dev/null``), page cache dropped before each run when
   permitted (``echo 3 > /proc/sys/vm/drop_caches``, root only), with
   verify's CPU time and the load average, and what one core checks per
   CPU-second (zstd and BLAKE3 apart): with a fast disk, verify's ceiling
   is that rate times the cores, and the load of others comes off it.
2. gc mark time for an 8 GiB sparse disk with 10 and with 100 restore
   points: it grows with the number of *distinct* map pages, not with
   restore points x disk size.  A naive walk (every restore point's whole
   map, no visited set) is timed beside it.

Run from the repository root::

    PYTHONPATH=. python tools/bench_maintenance.py [--dir DIR] [--runs N] [--verify-gib G]
                                                   [--only verify|mark] [--verify-repo REPO]
"""

from __future__ import annotations

import argparse
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

MiB = 1 << 20
# Repositories are encrypted by default; a benchmark is an unattended job.
os.environ.setdefault("REPOFS_PASSPHRASE", "bench")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from repofs.maintenance.gc.mark import Marker  # noqa: E402 - after the path set-up above
from repofs.store.mapwalk import MapWalker  # noqa: E402
from repofs.store.records import RecordType  # noqa: E402
from repofs.store.repository import Repository  # noqa: E402


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


def _child_cpu() -> float:
    """User plus system seconds of every child reaped so far."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def _busy_seconds() -> float:
    """CPU seconds the whole machine has been busy (steal included: the host took them)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def bench_verify(work: Path, gib: int, runs: int, existing: Path | None = None) -> dict[str, Any]:
    """``existing``: time that repository (kept) instead of building the test one."""
    if existing is None:
        repo = work / "verify-repo"
        img = work / "vm.img"
        make_vm_like_image(img, gib * 1024 * MiB, 1)
        cli("init", repo)
        cli("ingest", repo, "--vm", "bench", f"d0={img}")
        img.unlink()
    else:
        repo = existing
    packs = sorted((repo / "packs").glob("??/*.pack"))
    total = sum(p.stat().st_size for p in packs)
    cat_s, verify_s, verify_cpu, others = [], [], [], []
    cold = True
    load = [os.getloadavg()[0]]
    for _ in range(runs):
        cold &= drop_caches()
        t0 = time.monotonic()
        subprocess.run(f"cat {' '.join(map(str, packs))} > /dev/null", shell=True, check=True)
        cat_s.append(time.monotonic() - t0)
        cold &= drop_caches()
        c0, b0 = _child_cpu(), _busy_seconds()
        t0 = time.monotonic()
        cli("verify", repo)
        wall = time.monotonic() - t0
        cpu = _child_cpu() - c0
        verify_s.append(wall)
        verify_cpu.append(cpu)
        others.append(max(0.0, _busy_seconds() - b0 - cpu) / wall)  # cores others kept busy
        load.append(os.getloadavg()[0])
    rates = core_rates(repo)
    if existing is None:
        shutil.rmtree(repo)
    return {
        "pack_bytes": total,
        "logical_bytes": rates["logical_bytes"],
        "cold_cache": cold,
        "cat_mb_s": total / statistics.median(cat_s) / 1e6,
        "verify_mb_s": total / statistics.median(verify_s) / 1e6,
        "verify_logical_mb_s": rates["logical_bytes"] / statistics.median(verify_s) / 1e6,
        "cat_s": statistics.median(cat_s),
        "verify_s": statistics.median(verify_s),
        "verify_cpu_s": statistics.median(verify_cpu),
        "load": (min(load), max(load)),
        "others_cores": statistics.median(others),
        "cores": os.cpu_count() or 1,
        **{k: v for k, v in rates.items() if k != "logical_bytes"},
    }


def core_rates(repo_path: Path) -> dict[str, float]:
    """What one core checks per CPU-second: verify's ceiling is this times the cores.

    Every record is checked once more in this thread by verify's own
    ``_check_window``, and once split into its zstd and BLAKE3 steps, timed
    with ``thread_time`` so that other processes on the machine do not count.
    """
    import blake3
    import zstandard

    from repofs.maintenance.verify.recordcheck import _check_window
    from repofs.maintenance.verify.windows import _Entry, plan_windows
    from repofs.store.records import RECORD_HEADER, RECORD_HEADER_SIZE, Codec
    from repofs.store.schema import location_fields

    with Repository.open(str(repo_path)) as r:
        entries = sorted(
            _Entry(*location_fields(v), k[0], k[1:])
            for k, v in r.index.read(lambda t: list(r.index.items(t, "objects")))
        )
        windows = plan_windows(entries)
        check = unzstd = hashing = 0.0
        zstd_out = logical = stored = 0
        dctx = zstandard.ZstdDecompressor()
        for w in windows:
            fd = os.open(r.packs.path_of(w.pack_id), os.O_RDONLY)
            try:
                data = memoryview(os.pread(fd, w.length, w.start))
            finally:
                os.close(fd)
            t0 = time.thread_time()
            assert not _check_window(data, w)
            check += time.thread_time() - t0
            stored += w.nbytes
            for e in w.entries:
                start = e.offset - w.start
                codec = RECORD_HEADER.unpack_from(data, start)[2]
                body = start + RECORD_HEADER_SIZE
                payload = data[body : body + e.stored_len]
                t0 = time.thread_time()
                if codec == Codec.ZSTD:
                    raw = dctx.decompress(payload, max_output_size=e.raw_len)
                    unzstd += time.thread_time() - t0
                    zstd_out += e.raw_len
                    t0 = time.thread_time()
                else:
                    raw = payload
                blake3.blake3(raw).digest()
                hashing += time.thread_time() - t0
                logical += e.raw_len
    return {
        "logical_bytes": logical,
        "core_check_mb_s": stored / check / 1e6,
        "core_check_logical_mb_s": logical / check / 1e6,
        "core_zstd_mb_s": zstd_out / unzstd / 1e6,
        "core_blake3_mb_s": logical / hashing / 1e6,
        "zstd_share": zstd_out / logical,
    }


def bench_mark(work: Path, runs: int) -> dict[str, object]:
    """100 restore points of an 8 GiB sparse disk, each changing two chunks."""
    from ingest.formats.detect import open_source
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


def report_verify(v: dict[str, Any], runs: int) -> None:
    cache = "dropped" if v["cold_cache"] else "WARM (could not drop)"
    lo, hi = v["load"]
    print(
        f"verify: {v['pack_bytes'] / MiB:.0f} MiB of packs holding "
        f"{v['logical_bytes'] / MiB:.0f} MiB of data, cache {cache}; medians of {runs}; "
        f"load average {lo:.2f}-{hi:.2f} on {v['cores']} cores; other processes kept "
        f"{v['others_cores']:.2f} cores busy while verify ran"
    )
    print(f"  cat packs > /dev/null : {v['cat_s']:.2f} s  {v['cat_mb_s']:.0f} MB/s")
    print(
        f"  repofs verify         : {v['verify_s']:.2f} s  {v['verify_mb_s']:.0f} MB/s of packs "
        f"({100 * v['verify_mb_s'] / v['cat_mb_s']:.0f}% of cat), "
        f"{v['verify_logical_mb_s']:.0f} MB/s of data; CPU {v['verify_cpu_s']:.2f} s"
    )
    print(
        f"  one core checks {v['core_check_mb_s']:.0f} MB/s of packs "
        f"({v['core_check_logical_mb_s']:.0f} MB/s of data) per CPU-second: "
        f"zstd {v['core_zstd_mb_s']:.0f} MB/s out ({100 * v['zstd_share']:.0f}% of the data), "
        f"BLAKE3 {v['core_blake3_mb_s']:.0f} MB/s; "
        f"ceiling on {v['cores']} cores {v['cores'] * v['core_check_mb_s']:.0f} MB/s of packs"
    )


def report_mark(m: dict[Any, Any], runs: int) -> None:
    print(f"gc mark: 8 GiB sparse disk, two chunks changed per restore point; medians of {runs}")
    for n in (10, 100):
        r = m[n]
        print(
            f"  {r['restore_points']:>3} restore points: mark {r['mark_s'] * 1000:.1f} ms, "
            f"{r['distinct_pages_loaded']} distinct pages; naive walk "
            f"{r['naive_walk_s'] * 1000:.1f} ms, {r['naive_pages_loaded']} pages"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument(
        "--dir", default=None, help="scratch directory (default: a new one in /var/tmp)"
    )
    ap.add_argument("--runs", type=int, default=3, help="runs per figure; medians are reported")
    ap.add_argument("--verify-gib", type=int, default=2, help="size of the verify test image")
    ap.add_argument(
        "--verify-repo",
        type=Path,
        default=None,
        help="time verify on this existing repository (kept) instead of a new 2 GiB one",
    )
    ap.add_argument(
        "--only",
        choices=("verify", "mark"),
        default=None,
        help="run one of the two benchmarks (default: both)",
    )
    args = ap.parse_args()
    work = Path(args.dir or tempfile.mkdtemp(prefix="repofs-bench-", dir="/var/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        if args.only in (None, "verify"):
            v = bench_verify(work, args.verify_gib, args.runs, args.verify_repo)
            report_verify(v, args.runs)
        if args.only in (None, "mark"):
            report_mark(bench_mark(work, args.runs), args.runs)
    finally:
        if args.dir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
