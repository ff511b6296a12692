#!/usr/bin/env python3
"""What other zstd settings would buy on one disk image's chunks.  Not a test.

    PYTHONPATH=. python tools/bench_compression.py IMAGE [--chunk-size 128K]
        [--levels 3,4,5] [--every 4] [--dictionary 112K]

Cuts the image's allocated data into the repository's chunks (distinct,
non-zero ones, as ingest stores them), takes every ``--every``-th, and
compresses each on its own, as ingest does, at each level: the share of
bytes kept (a chunk that does not shrink counts whole, as it is stored raw)
and one thread's speed.  With ``--dictionary``, also level 3 with a
dictionary trained on a fifth of the sample and tried on another fifth.
This is where the storage decision in docs/performance.md comes from.
"""

from __future__ import annotations

import argparse
import os
import time

import blake3
import zstandard

from ingest.formats.detect import open_source
from repofs.store.config import parse_size


def sample_chunks(image: str, chunk_size: int, every: int) -> list[bytes]:
    source = open_source(image, None)
    zero = bytes(chunk_size)
    seen: dict[bytes, bytes] = {}
    try:
        for offset, length in source.allocated_extents():
            pos = offset - offset % chunk_size
            while pos < offset + length:
                data = source.read(pos, min(chunk_size, source.size - pos))
                if data != zero[: len(data)]:
                    seen.setdefault(blake3.blake3(data).digest(), data)
                pos += chunk_size
    finally:
        source.close()
    return list(seen.values())[::every]


def kept(compressor: zstandard.ZstdCompressor, chunks: list[bytes]) -> tuple[float, float]:
    """(share of bytes stored, MB/s of input on this thread)."""
    total = sum(len(c) for c in chunks)
    t0 = time.perf_counter()
    stored = sum(min(len(compressor.compress(c)), len(c)) for c in chunks)
    return stored / total, total / (time.perf_counter() - t0) / 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("image")
    ap.add_argument("--chunk-size", default="128K")
    ap.add_argument("--levels", default="3,4,5,6")
    ap.add_argument("--every", type=int, default=4, help="use every N-th distinct chunk")
    ap.add_argument("--dictionary", default=None, metavar="SIZE")
    args = ap.parse_args()
    chunk = parse_size(args.chunk_size)
    chunks = sample_chunks(os.path.abspath(args.image), chunk, args.every)
    mib = sum(len(c) for c in chunks) / 2**20
    print(f"{len(chunks)} distinct chunks of {args.chunk_size}, {mib:.0f} MiB")
    for level in (int(x) for x in args.levels.split(",")):
        share, speed = kept(zstandard.ZstdCompressor(level=level), chunks)
        print(f"zstd level {level:2d}: {share * 100:.2f} % kept, {speed:.0f} MB/s")
    if args.dictionary:
        train, test = chunks[::5], chunks[1::5]
        dictionary = zstandard.train_dictionary(parse_size(args.dictionary), train, level=3)
        plain, _ = kept(zstandard.ZstdCompressor(level=3), test)
        share, speed = kept(zstandard.ZstdCompressor(level=3, dict_data=dictionary), test)
        print(
            f"zstd level  3 with a {args.dictionary} dictionary: {share * 100:.2f} % kept "
            f"({plain * 100:.2f} % without, same chunks), {speed:.0f} MB/s"
        )


if __name__ == "__main__":
    main()
