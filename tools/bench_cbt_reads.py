#!/usr/bin/env python3
"""How fast this machine's disk serves the reads of one CBT incremental, apart from repofs.

    PYTHONPATH=. python tools/bench_cbt_reads.py IMAGE CBT_JSON [--chunk-size 128K]
        [--threads 1,4,16] [--runs 3]

reads every chunk that the changed-block list touches (rounded out to whole
chunks and merged into runs, as ``repofs ingest --changed-blocks`` plans
them before it leaves out holes) with ``O_DIRECT``, after dropping the page
cache (root), on 1, 4 and 16 threads: what reading an incremental's data
costs on this disk before repofs hashes, compresses or stores any of it,
and how much a deeper read queue could gain.
"""

from __future__ import annotations

import argparse
import mmap
import os
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

from ingest.cbt.jsonfile import load_json_changed_blocks
from ingest.plan import chunk_intervals
from repofs.store.config import parse_size


def read_all(path: str, runs: list[tuple[int, int]], threads: int) -> float:
    """Seconds to read ``runs`` of ``path`` cold with ``O_DIRECT`` on ``threads`` threads."""
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3")
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    size = os.fstat(fd).st_size

    def read(run: tuple[int, int]) -> None:
        off, length = run
        length = min(length, size - off)
        buf = mmap.mmap(-1, -(-length // 4096) * 4096)  # page-aligned, as O_DIRECT wants
        os.preadv(fd, [buf], off)

    try:
        t0 = time.perf_counter()
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(read, runs))
        return time.perf_counter() - t0
    finally:
        os.close(fd)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("image")
    ap.add_argument("cbt_json")
    ap.add_argument("--chunk-size", default="128K")
    ap.add_argument("--threads", default="1,4,16")
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    size = os.stat(args.image).st_size
    cbt = load_json_changed_blocks(args.cbt_json, size)
    chunk = parse_size(args.chunk_size)
    runs = [(a * chunk, (b - a) * chunk) for a, b in chunk_intervals(cbt, chunk, -(-size // chunk))]
    total = sum(min(n, size - o) for o, n in runs)
    print(f"{len(runs)} reads, {total / 2**20:.1f} MiB, chunk {args.chunk_size}")
    for threads in (int(t) for t in args.threads.split(",")):
        secs = [read_all(args.image, runs, threads) for _ in range(args.runs)]
        med = statistics.median(secs)
        spread = ", ".join(f"{s * 1e3:.0f}" for s in secs)
        print(
            f"threads {threads:2d}: median {med * 1e3:.0f} ms ({spread}), "
            f"{total / med / 1e6:.0f} MB/s"
        )


if __name__ == "__main__":
    main()
