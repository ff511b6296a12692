"""Source-format overhead and thin-disk cost of ingest (the figures of the formats issue).

1. The same disk ingested from raw, from VMDK monolithicSparse and from qcow2
   (both made by ``qemu-img convert``): the readers should cost little
   beyond what raw costs.
2. A 1 TiB thin raw disk with 1 GiB allocated against the same 1 GiB as a
   plain 1 GiB file: holes are never read, so both should take about as long.

Each figure is the median of ``--runs`` ingests, each into a fresh repository
(no dedup against an earlier run), with the page cache dropped before each
one when possible.  Prints a Markdown table for ``docs/performance.md``.

    python tools/bench_formats.py --image CORPUS_DAY0.img [--runs 3] [--work DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

GiB = 1 << 30
REPOFS = [sys.executable, "-m", "repofs"]
# Repositories are encrypted by default; a benchmark is an unattended job.
os.environ.setdefault("REPOFS_PASSPHRASE", "bench")


def drop_caches() -> None:
    try:
        subprocess.run(["sync"], check=True)
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        pass


def timed_ingest(work: Path, source: Path) -> float:
    repo = work / "repo"
    shutil.rmtree(repo, ignore_errors=True)
    subprocess.run([*REPOFS, "init", str(repo)], check=True, capture_output=True)
    drop_caches()
    t0 = time.monotonic()
    subprocess.run(
        [*REPOFS, "ingest", str(repo), "--vm", "b", f"d={source}"], check=True, capture_output=True
    )
    elapsed = time.monotonic() - t0
    shutil.rmtree(repo, ignore_errors=True)
    return elapsed


def median_ingest(work: Path, source: Path, runs: int) -> float:
    return statistics.median(timed_ingest(work, source) for _ in range(runs))


def thin_pair(work: Path, image: Path) -> tuple[Path, Path]:
    """1 GiB of the image's data as a plain file, and spread across a 1 TiB thin disk."""
    plain, thin = work / "plain-1g.raw", work / "thin-1t.raw"
    piece = 64 << 20
    with open(image, "rb") as src, open(plain, "wb") as p, open(thin, "wb") as t:
        t.truncate(1 << 40)
        p.truncate(GiB)
        offset = 0
        for i in range(GiB // piece):
            # data pieces from the image's populated region, spread 1/16 TiB apart
            src.seek((1 << 20) * 40 + i * piece)
            data = src.read(piece)
            p.seek(i * piece)
            p.write(data)
            t.seek(offset)
            t.write(data)
            offset += (1 << 40) // 16
    return plain, thin


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", type=Path, required=True, help="a raw corpus disk image")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--work", type=Path, default=Path("/var/tmp/repofs-bench-formats"))
    args = parser.parse_args()
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    sources = {"raw": args.image}
    for name, opts in (
        ("vmdk:monolithicSparse", ["-O", "vmdk", "-o", "subformat=monolithicSparse"]),
        ("qcow2", ["-O", "qcow2"]),
    ):
        out = work / f"disk.{name.split(':')[0]}"
        if not out.exists():
            subprocess.run(
                ["qemu-img", "convert", "-f", "raw", *opts, str(args.image), str(out)], check=True
            )
        sources[name] = out
    times = {name: median_ingest(work, path, args.runs) for name, path in sources.items()}
    plain, thin = thin_pair(work, args.image)
    t_plain = median_ingest(work, plain, args.runs)
    t_thin = median_ingest(work, thin, args.runs)
    print(
        f"Command: `python tools/bench_formats.py --image {args.image} --runs {args.runs}`; "
        f"medians of {args.runs} ingests, each into a fresh repository, page cache dropped.\n"
    )
    print("| source | full ingest, s | vs raw |")
    print("|---|---:|---:|")
    for name, t in times.items():
        print(f"| {name} | {t:.2f} | {t / times['raw']:.2f}x |")
    print()
    print("| source | full ingest, s | vs plain 1 GiB |")
    print("|---|---:|---:|")
    print(f"| 1 GiB of data, plain 1 GiB raw file | {t_plain:.2f} | 1.00x |")
    print(f"| the same 1 GiB in a 1 TiB thin raw disk | {t_thin:.2f} | {t_thin / t_plain:.2f}x |")
    for p in (plain, thin):
        p.unlink()


if __name__ == "__main__":
    main()
