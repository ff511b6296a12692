"""What encryption costs: full ingest and mount reads, encrypted against unencrypted.

    tools/bench_crypt.py [--size 4G] [--data 1G] [--runs 3] [--out DIR]     (root)

The corpus is the benchmark's own (tools/corpus.py, cached in DIR); each
round runs ``--encryption none`` and the default AES-256-GCM (and
ChaCha20-Poly1305 with ``--chacha``) in alternating order: a full ingest
with cold caches, then through a fresh mount a cold and a hot sequential
read (dd bs=1M) and 4 KiB random reads (p50).  It prints the medians as a
Markdown table, and the AEADs' own speed on 128 KiB chunks, the measurement
that chose the default cipher.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
sys.path.insert(0, str(ROOT))

from bench import (  # noqa: E402
    MiB,
    Repofs,
    Results,
    Step,
    allocated_offsets,
    drop_caches,
    log,
    random_reads,
    read_through,
)


def aead_speed() -> dict[str, float]:
    """GB/s of seal + open of 128 KiB chunks in one thread, median of 7 runs."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

    data = [os.urandom(128 * 1024) for _ in range(16)]
    out = {}
    for name, cls in (("aes-256-gcm", AESGCM), ("chacha20-poly1305", ChaCha20Poly1305)):
        aead = cls(os.urandom(32))
        runs = []
        for _ in range(7):
            t0 = time.perf_counter()
            for i in range(1000):
                nonce = os.urandom(12)
                aead.decrypt(nonce, aead.encrypt(nonce, data[i % 16], b"ad"), b"ad")
            runs.append(1000 * 128 * 1024 / (time.perf_counter() - t0) / 1e9)
        out[name] = statistics.median(runs)
    return out


def decode_cost(image: str) -> dict[str, float]:
    """CPU microseconds per chunk of the read path's decode (open, decompress, check the name).

    CPU time of one thread, not wall time: on a shared machine it resolves
    a difference of a few percent that the mount's throughput hides in noise.
    """
    from repofs.store.crypto import PLAIN, SealedKeys
    from repofs.store.records import Compressor, RecordHeader, RecordType, decode_payload

    chunks: list[bytes] = []
    with open(image, "rb") as f:
        offset = 0
        while len(chunks) < 400 and offset < os.path.getsize(image):
            f.seek(offset)
            piece = f.read(128 * 1024)
            offset += 7 * 128 * 1024
            if piece.strip(b"\0"):
                chunks.append(piece)
    comp = Compressor("zstd", 3)
    out = {}
    sealed = SealedKeys(os.urandom(32), "aes-256-gcm", os.urandom(16).hex())
    for name, keys in (("none", PLAIN), ("aes-256-gcm", sealed)):
        records = []
        for c in chunks:
            digest = keys.name(c)
            codec, payload = comp.compress(c)
            stored = keys.seal(RecordType.CHUNK, digest, payload)
            records.append(
                (RecordHeader(RecordType.CHUNK, codec, len(stored), len(c), digest), stored)
            )
        runs = []
        for _ in range(15):
            t0 = time.process_time()
            for hdr, stored in records:
                decode_payload(hdr, stored, "bench", keys)
            runs.append((time.process_time() - t0) / len(records) * 1e6)
        out[name] = statistics.median(runs)
    return out


def one_round(tool: Repofs, step: Step, offsets: list[int], res: Results) -> None:
    n = tool.name
    tool.reset()
    tool.init()
    drop_caches()
    r = tool.backup(step, use_cbt=False)
    res.add(f"{n}.full_s", r.wall)
    with tool.mounted(0) as (path, _pid):
        res.add(f"{n}.seq_cold_MBps", read_through(path, drop=True))
    with tool.mounted(0) as (path, _pid):
        res.add(f"{n}.seq_hot_MBps", read_through(path, drop=False))
    drop_caches()
    with tool.mounted(0) as (path, _pid):
        res.add(f"{n}.rand_p50_ms", random_reads(path, offsets)["p50"])
    shutil.rmtree(tool.work, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="4G")
    ap.add_argument("--data", default="1G")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--chacha", action="store_true")
    ap.add_argument("--out", type=Path, default=Path("/var/tmp/repofs-bench"))
    args = ap.parse_args()
    if os.geteuid() != 0:
        log("needs root (drop_caches, loop devices for the corpus)")
        return 1
    os.environ.setdefault("REPOFS_PASSPHRASE", "bench passphrase")
    import corpus

    cdir = args.out / f"corpus-s{args.seed}-{args.size}-{args.data}-d1"
    manifest = corpus.generate(
        cdir, args.seed, corpus.parse_size(args.size), corpus.parse_size(args.data), 1, 1
    )
    step = Step(str(cdir / manifest.vms[0].days[0].image), None)
    offsets = allocated_offsets(step.image, 2000, args.seed)
    work = args.out / "crypt-work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    modes = ["none", "aes-256-gcm"] + (["chacha20-poly1305"] if args.chacha else [])
    res = Results()
    for rnd in range(args.runs):
        order = modes[rnd % len(modes) :] + modes[: rnd % len(modes)]
        for mode in order:
            log(f"round {rnd + 1}/{args.runs}: {mode}")
            one_round(Repofs(work, name=f"repofs-{mode}", encryption=mode), step, offsets, res)
    speed = aead_speed()
    cost = decode_cost(step.image)
    allocated = manifest.vms[0].days[0].allocated_bytes
    print(f"\ncorpus: {args.size} disk, {allocated / MiB:.0f} MiB allocated; {args.runs} runs\n")
    print("| | full ingest s | MB/s | seq cold MB/s | seq hot MB/s | random 4K p50 ms |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    base = f"repofs-{modes[0]}"
    for mode in modes:
        n = f"repofs-{mode}"
        full = res.med(f"{n}.full_s")
        print(
            f"| {mode} | {full:.2f} | {allocated / full / 1e6:.0f} | "
            f"{res.med(f'{n}.seq_cold_MBps'):.0f} | {res.med(f'{n}.seq_hot_MBps'):.0f} | "
            f"{res.med(f'{n}.rand_p50_ms'):.3f} |"
        )
    for mode in modes[1:]:
        n = f"repofs-{mode}"
        ingest = res.med(f"{base}.full_s") / res.med(f"{n}.full_s")
        print(
            f"\n{mode} / none: ingest speed {ingest:.2f}x, "
            f"seq cold {res.med(f'{n}.seq_cold_MBps') / res.med(f'{base}.seq_cold_MBps'):.2f}x, "
            f"seq hot {res.med(f'{n}.seq_hot_MBps') / res.med(f'{base}.seq_hot_MBps'):.2f}x, "
            f"random p50 {res.med(f'{base}.rand_p50_ms') / res.med(f'{n}.rand_p50_ms'):.2f}x"
        )
    print("\nAEAD seal+open of 128 KiB chunks, one thread (GB/s, median of 7):")
    for name, v in speed.items():
        print(f"  {name}: {v:.2f}")
    print("\nRead path decode of a 128 KiB chunk (CPU us, one thread, median of 15):")
    for name, v in cost.items():
        print(f"  {name}: {v:.1f}")
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
