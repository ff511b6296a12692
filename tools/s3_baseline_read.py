"""The plain parallel ranged-GET reader: the limit an S3 repository's reads are measured against.

    tools/s3_baseline_read --bucket B [--prefix P] [--part-size 8M] [--threads 16]
    tools/s3_baseline_read --bucket B --prefix P --random4k 2000

It reads every object under the prefix with parallel ranged GETs through one shared boto3
client, exactly the way repofs fetches packs, and discards the bytes: what this reaches is
what the bucket, the network and boto3 allow, so a mount that reads at a fraction of it is
slow for its own reasons. Prints JSON: {bytes, seconds, MB_per_s, gets} (MB = 10^6 bytes);
with --random4k N, N random 4 KiB ranged GETs over the same objects and their p50/p99
latency in ms. Endpoint and credentials follow boto3's conventions (AWS_ENDPOINT_URL,
AWS_ACCESS_KEY_ID, ...); --endpoint overrides the endpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import boto3
import botocore.config


def _size(text: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    text = text.strip().lower().removesuffix("ib").removesuffix("b")
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def make_client(endpoint: str | None, threads: int) -> Any:
    config = botocore.config.Config(
        max_pool_connections=max(threads, 10) + 4,
        retries={"mode": "standard"},
        s3={"addressing_style": "path"},
    )
    return boto3.session.Session().client("s3", endpoint_url=endpoint, config=config)


def list_objects(s3: Any, bucket: str, prefix: str) -> list[tuple[str, int]]:
    objects: list[tuple[str, int]] = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        objects += [(obj["Key"], obj["Size"]) for obj in page.get("Contents", [])]
    return objects


def _get(s3: Any, bucket: str, key: str, start: int, length: int) -> int:
    response = s3.get_object(Bucket=bucket, Key=key, Range=f"bytes={start}-{start + length - 1}")
    return len(response["Body"].read())


def sequential(
    s3: Any, bucket: str, objects: list[tuple[str, int]], part_size: int, threads: int
) -> dict[str, Any]:
    parts = [
        (key, offset, min(part_size, size - offset))
        for key, size in objects
        for offset in range(0, size, part_size)
    ]
    began = time.monotonic()
    with ThreadPoolExecutor(threads) as pool:
        done = sum(pool.map(lambda part: _get(s3, bucket, *part), parts))
    seconds = time.monotonic() - began
    return {
        "bytes": done,
        "seconds": round(seconds, 4),
        "MB_per_s": round(done / seconds / 1e6, 1) if seconds else None,
        "gets": len(parts),
        "objects": len(objects),
        "part_size": part_size,
        "threads": threads,
    }


def random_4k(
    s3: Any, bucket: str, objects: list[tuple[str, int]], count: int, threads: int, seed: int
) -> dict[str, Any]:
    rng = random.Random(seed)
    usable = [(key, size) for key, size in objects if size > 0]
    weights = [size for _, size in usable]
    picks = []
    for key, size in rng.choices(usable, weights=weights, k=count):
        start = rng.randrange(max(1, size - 4096 + 1)) if size > 4096 else 0
        picks.append((key, start, min(4096, size - start)))
    latencies: list[float] = []
    lock = threading.Lock()

    def one(pick: tuple[str, int, int]) -> int:
        t0 = time.monotonic()
        got = _get(s3, bucket, *pick)
        elapsed = time.monotonic() - t0
        with lock:
            latencies.append(elapsed)
        return got

    began = time.monotonic()
    with ThreadPoolExecutor(threads) as pool:
        done = sum(pool.map(one, picks))
    seconds = time.monotonic() - began
    latencies.sort()

    def pct(p: float) -> float:
        return round(latencies[min(len(latencies) - 1, int(p * len(latencies)))] * 1000, 2)

    return {
        "gets": count,
        "bytes": done,
        "seconds": round(seconds, 4),
        "gets_per_s": round(count / seconds, 1) if seconds else None,
        "p50_ms": pct(0.50),
        "p99_ms": pct(0.99),
        "max_ms": round(latencies[-1] * 1000, 2),
        "threads": threads,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="s3_baseline_read", description=__doc__.split("\n")[0])
    parser.add_argument("--endpoint", default=os.environ.get("AWS_ENDPOINT_URL"))
    parser.add_argument("--bucket", required=True)
    parser.add_argument("--prefix", default="")
    parser.add_argument("--part-size", type=_size, default=8 << 20, help="default 8M")
    parser.add_argument("--threads", type=int, default=16, help="default 16")
    parser.add_argument("--random4k", type=int, metavar="N", help="N random 4 KiB GETs instead")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    if args.threads < 1 or args.part_size < 1:
        parser.error("--threads and --part-size must be positive")
    s3 = make_client(args.endpoint, args.threads)
    objects = list_objects(s3, args.bucket, args.prefix)
    if not objects:
        print(f"s3_baseline_read: error: no objects under s3://{args.bucket}/{args.prefix}",
              file=sys.stderr)
        return 1
    if args.random4k:
        result = random_4k(s3, args.bucket, objects, args.random4k, args.threads, args.seed)
    else:
        result = sequential(s3, args.bucket, objects, args.part_size, args.threads)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
