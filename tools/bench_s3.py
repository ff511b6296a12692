"""``tools/bench --s3``: repofs on an S3 bucket (SeaweedFS on loopback) against a local directory.

Each round starts nothing new: one SeaweedFS (``weed mini``, free loopback
ports, data in the work directory) serves every round, and a fresh bucket
per measurement keeps them apart.  A round measures

1. a full ingest of day 0 of the corpus into a local directory and into a
   bucket, page cache dropped before each: the ratio of their speeds, and
   the requests and bytes of the bucket's ingest (``REPOFS_S3_STATS``);
2. the changed-block incremental of day 1 into that bucket: its requests
   and bytes uploaded against the bytes the changed-block list names;
3. a sequential read (``dd bs=1M``) of day 1's exposed disk through
   ``repofs mount`` on a fresh host (an empty ``--cache-dir``, page cache
   dropped), against ``tools/s3_baseline_read`` (parallel ranged GETs of
   the repository's packs) on the same server, and against the same read
   from the local directory (day 1 ingested there too): the mount's own
   ceiling on this machine; both reads again by a reader that opens with
   ``O_DIRECT`` (no page cache, 1 MiB requests);
4. random 4 KiB reads through a mount on another fresh host: p50, p99;
5. the full ingest and the sequential read again through
   ``tools/latency_proxy --rtt-ms 30``, against their loopback figures.

Once, after the rounds: a bucket with ``--scale-rps`` restore points (1000)
built by one process ingesting in a loop through the Python API, then
``repofs mount`` until it answers and ``repofs list`` on an empty cache
directory, three times each.  The figures go to ``results-s3.json`` in
``--out``, a table on stdout, and ``docs/performance.md`` between the
``bench-s3:begin`` and ``bench-s3:end`` markers.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
sys.path.insert(0, str(ROOT))

from bench import (  # noqa: E402
    PY,
    GiB,
    MiB,
    Results,
    Step,
    allocated_offsets,
    drop_caches,
    fmt,
    loadavg,
    log,
    random_reads,
)

BEGIN, END = "<!-- bench-s3:begin -->", "<!-- bench-s3:end -->"
RTT_MS = 30.0
PREFIX = "repo"
TB = 10**12
FIXED_PUTS = 2  #: PUTs of an ingest that carry no data: its lease and its commit object


class Server:
    """One SeaweedFS for the whole benchmark, and the environment a repofs process needs."""

    def __init__(self, work: Path) -> None:
        from tests.support.s3server import S3Server

        self.s3 = S3Server(work / "weed", volume_size_mb=1024, max_volumes=64)
        self.s3.start()
        self.buckets = 0
        self.proxy: subprocess.Popen[str] | None = None
        self.proxy_endpoint = ""

    def bucket(self, what: str) -> str:
        self.buckets += 1
        name = f"{what}-{self.buckets}"
        self.s3.create_bucket(name)
        return name

    def env(self, via_proxy: bool = False) -> dict[str, str]:
        env = self.s3.env()
        if via_proxy:
            env["AWS_ENDPOINT_URL"] = self.proxy_endpoint
        return env

    def start_proxy(self, rtt_ms: float) -> None:
        self.proxy = subprocess.Popen(
            [PY, str(ROOT / "tools" / "latency_proxy.py"), "--listen", "127.0.0.1:0",
             "--target", f"127.0.0.1:{self.s3.ports['s3']}", "--rtt-ms", str(rtt_ms)],
            stdout=subprocess.PIPE, text=True)
        assert self.proxy.stdout is not None
        line = self.proxy.stdout.readline().strip()
        if not line.startswith("listening on "):
            raise RuntimeError(f"latency_proxy did not start: {line!r}")
        self.proxy_endpoint = "http://" + line.removeprefix("listening on ")

    def cpu_s(self) -> float:
        """CPU seconds the server has used so far (user + system, all its threads)."""
        assert self.s3.proc is not None
        fields = Path(f"/proc/{self.s3.proc.pid}/stat").read_text().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def close(self) -> None:
        if self.proxy is not None:
            self.proxy.send_signal(signal.SIGTERM)
            try:
                self.proxy.wait(10)
            except subprocess.TimeoutExpired:
                self.proxy.kill()
                self.proxy.wait()
        self.s3.stop()


class Host:
    """A simulated host: its own cache directory, and the request counts of its commands."""

    def __init__(self, work: Path, name: str, server: Server, via_proxy: bool = False) -> None:
        self.dir = work / "hosts" / name
        shutil.rmtree(self.dir, ignore_errors=True)
        self.cache = self.dir / "cache"
        self.stats = self.dir / "stats.jsonl"
        self.dir.mkdir(parents=True)
        self.env = {**server.env(via_proxy), "REPOFS_CACHE_DIR": str(self.cache),
                    "REPOFS_S3_STATS": str(self.stats), "PYTHONPATH": str(ROOT)}

    def counts(self, pid: int | None = None) -> dict[str, int]:
        """The counts the last command (or the command ``pid``) wrote at its exit."""
        lines = self.stats.read_text().splitlines() if self.stats.exists() else []
        docs = [json.loads(line) for line in lines]
        if pid is not None:
            docs = [d for d in docs if d["pid"] == pid]
        return docs[-1]["counts"] if docs else {}

    def run(self, *args: str, check: bool = True) -> tuple[float, str]:
        """``repofs ARGS`` as this host: wall seconds and stdout (CPU seconds: :attr:`cpu`)."""
        r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        proc = subprocess.run([PY, "-m", "repofs", *args], env={**os.environ, **self.env},
                              capture_output=True, text=True)
        wall = time.perf_counter() - t0
        r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        self.cpu = r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime
        if check and proc.returncode != 0:
            raise RuntimeError(f"repofs {' '.join(args)}: {proc.stderr.strip()[-1500:]}")
        return wall, proc.stdout

    @contextlib.contextmanager
    def mounted(self, url: str, mnt: Path, rp: str) -> Any:
        """Day ``rp``'s disk through ``repofs mount --foreground`` (so that it reports counts)."""
        mnt.mkdir(parents=True, exist_ok=True)
        proc = subprocess.Popen([PY, "-m", "repofs", "mount", "--foreground", url, str(mnt)],
                                env={**os.environ, **self.env}, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
        path = mnt / "vm1" / rp / "disk0-flat.vmdk"
        t0 = time.perf_counter()
        try:
            deadline = time.monotonic() + 120
            while not path.exists():
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"mount failed: {proc.stderr.read()[-800:]}")  # type: ignore[union-attr]
                time.sleep(0.02)
            yield str(path), time.perf_counter() - t0, proc.pid
        finally:
            subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True)
            if os.path.ismount(mnt):
                subprocess.run(["fusermount3", "-uz", str(mnt)], capture_output=True)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def dd(path: str, direct: bool = False) -> float:
    """Seconds of a sequential ``dd bs=1M`` of the whole file (``direct``: iflag=direct)."""
    t0 = time.perf_counter()
    flags = ["iflag=direct"] if direct else []
    subprocess.run(["dd", f"if={path}", "of=/dev/null", "bs=1M", *flags], check=True,
                   capture_output=True)
    return time.perf_counter() - t0


def baseline_read(server: Server, bucket: str, via_proxy: bool = False,
                  random4k: int = 0) -> dict[str, Any]:
    cmd = [PY, str(ROOT / "tools" / "s3_baseline_read.py"), "--bucket", bucket,
           "--prefix", f"{PREFIX}/packs/"]
    if random4k:
        cmd += ["--random4k", str(random4k), "--threads", "1"]
    out = subprocess.run(cmd, env={**os.environ, **server.env(via_proxy)}, check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out)


def ingest_args(url: str, step: Step, cbt: bool) -> list[str]:
    args = ["ingest", url, "--vm", "vm1", f"disk0={step.image}"]
    if cbt and step.cbt:
        args += ["--changed-blocks", f"disk0={step.cbt}"]
    return args


def per_gib(counts: dict[str, int], key: str, nbytes: int) -> float:
    return counts.get(key, 0) / (nbytes / GiB) if nbytes else float("nan")


# -- one round ------------------------------------------------------------------------------


def round_loopback(server: Server, work: Path, steps: list[Step], res: Results,
                   offsets: list[int], info: dict[str, Any]) -> str:
    """Ingest local vs bucket, the incremental, the cold reads; the bucket's name."""
    local = work / "local-repo"
    shutil.rmtree(local, ignore_errors=True)
    host = Host(work, "writer", server)
    host.run("init", str(local))
    drop_caches()
    local_s, _ = host.run(*ingest_args(str(local), steps[0], False))
    res.add("local.full_s", local_s)
    res.add("local.full_cpu_s", host.cpu)
    # the control for the read: the same restore point from the local directory, cold
    if len(steps) > 1:
        host.run(*ingest_args(str(local), steps[1], True))
    _, out = host.run("list", str(local), "vm1", "--json")
    rp = sorted(r["id"] for r in json.loads(out))[-1]
    drop_caches()
    with host.mounted(str(local), work / "mnt-local", rp) as (path, _ready, _pid):
        res.add("local.seq_s", dd(path))
    drop_caches()
    with host.mounted(str(local), work / "mnt-local", rp) as (path, _ready, _pid):
        res.add("local.seq_direct_s", dd(path, direct=True))
    shutil.rmtree(local, ignore_errors=True)

    bucket = server.bucket("bench")
    url = f"s3://{bucket}/{PREFIX}"
    host.run("init", url)
    drop_caches()
    weed0 = server.cpu_s()
    s3_s, _ = host.run(*ingest_args(url, steps[0], False))
    res.add("s3.full_server_cpu_s", server.cpu_s() - weed0)
    res.add("s3.full_cpu_s", host.cpu)
    c = host.counts()
    res.add("s3.full_s", s3_s)
    res.add("s3.full_ratio", local_s / s3_s)
    for key in ("PUT", "GET", "HEAD", "LIST", "DELETE", "bytes_up", "bytes_down"):
        res.add(f"s3.full_{key}", c.get(key, 0))
    log(f"full ingest: local {local_s:.1f} s, bucket {s3_s:.1f} s = {local_s / s3_s:.2f}x; "
        f"CPU s: local {res.samples['local.full_cpu_s'][-1]:.1f}, bucket {host.cpu:.1f} + "
        f"server {res.samples['s3.full_server_cpu_s'][-1]:.1f}; {c}")

    if len(steps) > 1:
        drop_caches()
        incr_s, _ = host.run(*ingest_args(url, steps[1], True))
        c = host.counts()
        res.add("s3.incr_s", incr_s)
        for key in ("PUT", "GET", "HEAD", "LIST", "DELETE", "bytes_up", "bytes_down"):
            res.add(f"s3.incr_{key}", c.get(key, 0))
        log(f"incremental: {incr_s:.2f} s; {c}")
    _, out = host.run("list", url, "vm1", "--json")
    rp = sorted(r["id"] for r in json.loads(out))[-1]

    # sequential read on a fresh host, against the plain ranged-GET reader
    reader = Host(work, "reader", server)
    drop_caches()
    with reader.mounted(url, work / "mnt-seq", rp) as (path, _ready, pid):
        seq_s = dd(path)
    c = reader.counts(pid)
    # the same with O_DIRECT (no page cache, 1 MiB requests): the mount without the kernel's
    # readahead in the way, on another fresh host
    direct = Host(work, "reader-direct", server)
    drop_caches()
    with direct.mounted(url, work / "mnt-seq", rp) as (path, _ready, _pid):
        res.add("s3.seq_direct_s", dd(path, direct=True))
    size = os.path.getsize(steps[min(1, len(steps) - 1)].image)
    res.add("s3.seq_s", seq_s)
    res.add("s3.seq_MBps", size / seq_s / 1e6)
    res.add("s3.seq_data_MBps", info["read_data_bytes"] / seq_s / 1e6)
    res.add("s3.seq_down_MBps", c.get("bytes_down", 0) / seq_s / 1e6)
    res.add("s3.seq_GET", c.get("GET", 0))
    res.add("s3.seq_bytes_down", c.get("bytes_down", 0))
    drop_caches()
    base = baseline_read(server, bucket)
    res.add("base.seq_MBps", base["MB_per_s"])
    res.add("base.seq_s", base["seconds"])
    res.add("base.seq_bytes", base["bytes"])
    # the same bytes at each one's rate: the mount's download rate against the plain reader's
    res.add("s3.seq_vs_base", (c.get("bytes_down", 0) / seq_s / 1e6) / base["MB_per_s"])
    log(f"sequential read: local mount {res.samples['local.seq_s'][-1]:.1f} s "
        f"(O_DIRECT {res.samples['local.seq_direct_s'][-1]:.1f} s), "
        f"bucket mount {seq_s:.1f} s (O_DIRECT {res.samples['s3.seq_direct_s'][-1]:.1f} s, "
        f"{c.get('bytes_down', 0) / MiB:.0f} MiB down, "
        f"{c.get('GET', 0)} GETs), baseline {base['seconds']:.1f} s ({base['MB_per_s']} MB/s)")

    # random 4 KiB reads on another fresh host
    rnd = Host(work, "random", server)
    drop_caches()
    with rnd.mounted(url, work / "mnt-rand", rp) as (path, ready, pid):
        lat = random_reads(path, offsets)
    for key, v in lat.items():
        res.add(f"s3.rand_{key}_ms", v)
    res.add("s3.rand_mount_ready_s", ready)
    res.add("s3.rand_GET", rnd.counts(pid).get("GET", 0))
    base4k = baseline_read(server, bucket, random4k=min(len(offsets), 500))
    res.add("base.rand_p50_ms", base4k["p50_ms"])
    res.add("base.rand_p99_ms", base4k["p99_ms"])
    log(f"random 4 KiB: p50 {lat['p50']:.2f} ms, p99 {lat['p99']:.2f} ms; one ranged GET "
        f"p50 {base4k['p50_ms']} ms, p99 {base4k['p99_ms']} ms")
    return bucket


def round_wan(server: Server, work: Path, steps: list[Step], res: Results,
              loop_bucket: str, info: dict[str, Any]) -> None:
    """The full ingest and the cold sequential read through the latency proxy."""
    host = Host(work, "wan-writer", server, via_proxy=True)
    bucket = server.bucket("wan")
    url = f"s3://{bucket}/{PREFIX}"
    host.run("init", url)
    drop_caches()
    wall, _ = host.run(*ingest_args(url, steps[0], False))
    res.add("wan.full_s", wall)
    res.add("wan.full_vs_loopback", res.samples["s3.full_s"][-1] / wall)
    log(f"full ingest, {RTT_MS:.0f} ms RTT: {wall:.1f} s")
    # the read: the loopback round's bucket (the same restore point), through the proxy
    url = f"s3://{loop_bucket}/{PREFIX}"
    reader = Host(work, "wan-reader", server, via_proxy=True)
    _, out = reader.run("list", url, "vm1", "--json")
    rp = sorted(r["id"] for r in json.loads(out))[-1]
    shutil.rmtree(reader.cache, ignore_errors=True)
    drop_caches()
    with reader.mounted(url, work / "mnt-wan", rp) as (path, _ready, _pid):
        seq_s = dd(path)
    res.add("wan.seq_s", seq_s)
    res.add("wan.seq_data_MBps", info["read_data_bytes"] / seq_s / 1e6)
    res.add("wan.seq_vs_loopback", res.samples["s3.seq_s"][-1] / seq_s)
    base = baseline_read(server, loop_bucket, via_proxy=True)
    res.add("wan.base_seq_MBps", base["MB_per_s"])
    log(f"sequential read, {RTT_MS:.0f} ms RTT: {seq_s:.1f} s; baseline {base['MB_per_s']} MB/s")


# -- 1000 restore points ----------------------------------------------------------------------


def build_scale(url: str, count: int, cache: str) -> None:
    """``count`` restore points of one small VM: one process ingesting in a loop (a child)."""
    from ingest.formats.raw import RawSource
    from ingest.pipeline import DiskRequest, Ingest
    from repofs.store.config import DEFAULT_CHUNK
    from repofs.store.location import set_s3_settings
    from repofs.store.opening import init_repository

    set_s3_settings(cache_dir=cache)
    img = Path(cache).parent / "scale.img"
    img.parent.mkdir(parents=True, exist_ok=True)
    rng = random.Random(7)
    with open(img, "wb") as f:
        f.write(rng.randbytes(4 * MiB))
    repo = init_repository(url, DEFAULT_CHUNK, "zstd:3")
    base = 1_700_000_000
    t0 = time.monotonic()
    try:
        for i in range(count):
            with open(img, "r+b") as f:
                f.seek(rng.randrange(4 * MiB // 4096) * 4096)
                f.write(rng.randbytes(4096))
            with RawSource(str(img)) as src:
                parent = repo.latest("vm1")
                Ingest(repo, "vm1", [DiskRequest("disk0", src)], [], parent=parent,
                       progress=False).run(now=base + i * 3600)
            if (i + 1) % 100 == 0:
                log(f"scale: {i + 1}/{count} restore points, {time.monotonic() - t0:.0f} s")
    finally:
        repo.close()
    img.unlink()


def measure_scale(server: Server, work: Path, count: int, runs: int, res: Results) -> None:
    bucket = server.bucket("scale")
    url = f"s3://{bucket}/{PREFIX}"
    builder = Host(work, "scale-builder", server)
    t0 = time.perf_counter()
    subprocess.run([PY, __file__, "build-scale", url, str(count), str(builder.cache)],
                   env={**os.environ, **builder.env}, check=True)
    res.info["scale.build_s"] = time.perf_counter() - t0
    res.info["scale.build_counts"] = builder.counts()
    mnt = work / "mnt-scale"
    mnt.mkdir(parents=True, exist_ok=True)
    for i in range(runs):
        fresh = Host(work, f"scale-fresh-{i}", server)
        wall, _ = fresh.run("mount", url, str(mnt))  # returns once the mount answers
        try:
            t0 = time.perf_counter()
            n = len(os.listdir(mnt / "vm1"))
            res.add("scale.ls_ms", (time.perf_counter() - t0) * 1e3)
        finally:
            fresh.run("umount", str(mnt), check=False)
        res.add("scale.mount_ready_s", wall)
        c = fresh.counts()
        res.add("scale.mount_GET", c.get("GET", 0))
        res.add("scale.mount_LIST", c.get("LIST", 0))
        res.add("scale.mount_bytes_down", c.get("bytes_down", 0))
        res.info["scale.entries"] = n
        fresh = Host(work, f"scale-list-{i}", server)
        wall, out = fresh.run("list", url, "vm1", "--json")
        res.add("scale.list_s", wall)
        res.info["scale.listed"] = len(json.loads(out))
        log(f"scale: mount ready {res.samples['scale.mount_ready_s'][-1]:.2f} s "
            f"({n} entries), list {wall:.2f} s ({res.info['scale.listed']} restore points)")


# -- the report -------------------------------------------------------------------------------


def summary(res: Results, info: dict[str, Any]) -> dict[str, Any]:
    """The medians, and the per-GiB and per-TB figures computed from them."""
    m = res.med
    data = info["allocated_bytes"]
    out: dict[str, Any] = {k: m(k) for k in sorted(res.samples)}
    up = m("s3.full_bytes_up")
    out["full_PUT_per_GiB"] = m("s3.full_PUT") / (data / GiB)
    out["full_bytes_up_per_GiB"] = up / (data / GiB)
    out["full_GET_per_GiB"] = m("s3.full_GET") / (data / GiB)
    read_data = info["read_data_bytes"]
    out["seq_GET_per_GiB_read"] = m("s3.seq_GET") / (read_data / GiB)
    out["seq_bytes_down_per_GiB_read"] = m("s3.seq_bytes_down") / (read_data / GiB)
    # An ingest's own requests besides its packs: the lease and the commit object (PUT), the
    # sync (GET, LIST), the lease's end (DELETE); they do not grow with the data.
    fixed_put = FIXED_PUTS
    out["per_TB_ingested"] = {
        "PUT": (m("s3.full_PUT") - fixed_put) / (data / GiB) * TB / GiB,
        "bytes_up": out["full_bytes_up_per_GiB"] * TB / GiB,
        "per_ingest_PUT": fixed_put,
        "per_ingest_other": m("s3.full_GET") + m("s3.full_HEAD") + m("s3.full_LIST")
        + m("s3.full_DELETE"),
    }
    out["per_TB_restored"] = {
        "GET": out["seq_GET_per_GiB_read"] * TB / GiB,
        "bytes_down": out["seq_bytes_down_per_GiB_read"] * TB / GiB,
    }
    changed = info.get("changed_bytes")
    if changed:
        out["incr_bytes_up_per_changed_byte"] = m("s3.incr_bytes_up") / changed
        out["incr_PUT_per_GiB_changed"] = m("s3.incr_PUT") / (changed / GiB)
    return out


def render(res: Results, info: dict[str, Any], s: dict[str, Any], argv: list[str],
           elapsed: float) -> str:
    m = res.med
    runs = len(res.samples.get("s3.full_s", []))
    data = info["allocated_bytes"]
    read_data = info["read_data_bytes"]
    def verdict(ok: bool) -> str:
        return "met" if ok else "**missed**"

    lines = [BEGIN, "",
             f"Generated by `tools/bench {' '.join(argv)}` in {elapsed / 60:.0f} min; medians of "
             f"{runs} round(s), the scale figures of {len(res.samples.get('scale.list_s', []))} "
             f"runs (load average {info['load_start']:.2f} at start, "
             f"{info.get('load_end', loadavg()):.2f} at end). "
             f"Server: SeaweedFS `weed mini` on loopback, sharing the {os.cpu_count()} cores; "
             f"corpus day 0 holds {data / MiB:,.0f} MiB of data, day 1's changed-block list "
             f"names {info.get('changed_bytes', 0) / MiB:,.1f} MiB.", "",
             "| figure | value | target |", "|---|---:|---|"]
    ratio = m("s3.full_ratio")
    lines += [
        f"| full ingest into a local directory, s | {fmt(m('local.full_s'), 1)} | |",
        f"| full ingest into the bucket, s | {fmt(m('s3.full_s'), 1)} | |",
        f"| bucket / local ingest speed | {ratio:.2f}x | >= 0.7x: {verdict(ratio >= 0.7)} |",
        f"| CPU seconds: local ingest / bucket ingest (client) / the server during it | "
        f"{m('local.full_cpu_s'):.1f} / {m('s3.full_cpu_s'):.1f} / "
        f"{m('s3.full_server_cpu_s'):.1f} | |",
        f"| full ingest: PUTs per GiB of image data | {fmt(s['full_PUT_per_GiB'], 1)} | |",
        f"| full ingest: MiB uploaded per GiB of image data | "
        f"{fmt(s['full_bytes_up_per_GiB'] / MiB, 0)} | |",
        f"| full ingest: GET / HEAD / LIST / DELETE requests | {m('s3.full_GET'):.0f} / "
        f"{m('s3.full_HEAD'):.0f} / {m('s3.full_LIST'):.0f} / {m('s3.full_DELETE'):.0f} | |",
    ]
    if "s3.incr_s" in res.samples:
        lines += [
            f"| changed-block incremental (day 1), s | {fmt(m('s3.incr_s'), 2)} | |",
            f"| incremental: PUTs / MiB uploaded | {m('s3.incr_PUT'):.0f} / "
            f"{m('s3.incr_bytes_up') / MiB:.1f} | proportional to the change |",
            f"| incremental: bytes uploaded per byte the changed-block list names | "
            f"{s.get('incr_bytes_up_per_changed_byte', float('nan')):.2f} | |",
        ]
    seq_ratio = m("base.seq_s") / m("s3.seq_s")
    local_ratio = m("local.seq_s") / m("s3.seq_s")
    disk_ratio = m("s3.seq_MBps") / m("base.seq_MBps")
    lines += [
        f"| sequential read through the mount, fresh host, s ({info['read_size'] / GiB:.0f} GiB "
        f"disk, {read_data / MiB:,.0f} MiB of data) | {fmt(m('s3.seq_s'), 1)} | |",
        f"| the same, MB/s of disk data / MB/s downloaded | {fmt(m('s3.seq_data_MBps'), 0)} / "
        f"{fmt(m('s3.seq_down_MBps'), 0)} | |",
        f"| the same read from the local directory repository, cold, s (the mount's own "
        f"ceiling) | {fmt(m('local.seq_s'), 1)} | |",
        f"| the same two reads by a reader that opens with O_DIRECT (`dd iflag=direct`), s: "
        f"bucket / local directory | {fmt(m('s3.seq_direct_s'), 1)} / "
        f"{fmt(m('local.seq_direct_s'), 1)} | |",
        f"| restore speed with O_DIRECT: baseline's time / the mount's | "
        f"{m('base.seq_s') / m('s3.seq_direct_s'):.2f} | >= 0.70: "
        f"{verdict(m('base.seq_s') / m('s3.seq_direct_s') >= 0.7)} |",
        f"| `tools/s3_baseline_read` of the repository's packs (16 threads, 8 MiB GETs), MB/s | "
        f"{fmt(m('base.seq_MBps'), 0)} | |",
        f"| restore speed: baseline's time to fetch the packs / the mount's time to read the "
        f"disk | {seq_ratio:.2f} | >= 0.70: {verdict(seq_ratio >= 0.7)} |",
        f"| the mount's download rate / the baseline's | {m('s3.seq_vs_base'):.2f} | |",
        f"| MB/s of the whole disk (holes included) / the baseline's MB/s | {disk_ratio:.2f} | |",
        f"| bucket mount / local directory mount, same read | {local_ratio:.2f} | |",
        f"| sequential read: GETs per GiB of disk data read | "
        f"{fmt(s['seq_GET_per_GiB_read'], 1)} | |",
        f"| random 4 KiB read through the mount, fresh host, p50 / p99, ms | "
        f"{m('s3.rand_p50_ms'):.2f} / {m('s3.rand_p99_ms'):.2f} | p99 < 10: "
        f"{verdict(m('s3.rand_p99_ms') < 10)} |",
        f"| one 4 KiB ranged GET (`s3_baseline_read --random4k`, 1 thread), p50 / p99, ms | "
        f"{m('base.rand_p50_ms'):.2f} / {m('base.rand_p99_ms'):.2f} | |",
    ]
    if "wan.full_s" in res.samples:
        w1, w2 = m("wan.full_vs_loopback"), m("wan.seq_vs_loopback")
        lines += [
            f"| full ingest through a {RTT_MS:.0f} ms RTT proxy, s | {fmt(m('wan.full_s'), 1)} "
            "| |",
            f"| ... / loopback speed | {w1:.2f} | >= 0.5: {verdict(w1 >= 0.5)} |",
            f"| sequential read through the proxy, s | {fmt(m('wan.seq_s'), 1)} | |",
            f"| ... / loopback speed | {w2:.2f} | >= 0.5: {verdict(w2 >= 0.5)} |",
            f"| `s3_baseline_read` through the proxy, MB/s | {fmt(m('wan.base_seq_MBps'), 0)} "
            "| |",
        ]
    if "scale.mount_ready_s" in res.samples:
        n = info.get("scale_rps")
        ready = m("scale.mount_ready_s")
        lines += [
            f"| fresh host, {n} restore points: `repofs mount` ready, s | {ready:.2f} | < 3 s: "
            f"{verdict(ready < 3)} |",
            f"| ... its requests: GET / LIST, KiB downloaded | {m('scale.mount_GET'):.0f} / "
            f"{m('scale.mount_LIST'):.0f}, {m('scale.mount_bytes_down') / 1024:,.0f} | |",
            f"| fresh host, {n} restore points: `repofs list REPO vm1 --json`, s | "
            f"{m('scale.list_s'):.2f} | |",
            f"| building them (one process, {n} ingests), s | "
            f"{info.get('scale.build_s', float('nan')):.0f} | |",
        ]
    pt, pr = s["per_TB_ingested"], s["per_TB_restored"]
    lines += ["", "Per TB (10^12 bytes) of image data, from the per-GiB figures above:", "",
              "| | requests | bytes moved |", "|---|---:|---:|",
              f"| ingested (new data) | {pt['PUT']:,.0f} pack PUTs, plus per ingest "
              f"{pt['per_ingest_PUT']} PUTs and {pt['per_ingest_other']:.0f} GET/LIST/DELETE | "
              f"{pt['bytes_up'] / 1e9:,.0f} GB up |",
              f"| restored (sequential read, cold) | {pr['GET']:,.0f} GETs | "
              f"{pr['bytes_down'] / 1e9:,.0f} GB down |", "",
              f"Raw samples: `{info['results']}`.", "", END]
    return "\n".join(lines)


def write_doc(path: Path, block: str) -> None:
    text = path.read_text() if path.exists() else "# Performance\n"
    if BEGIN in text and END in text:
        a, b = text.index(BEGIN), text.index(END) + len(END)
        path.write_text(text[:a] + block + text[b:])
    else:
        path.write_text(text.rstrip("\n") + "\n\n## Object storage\n\n" + block + "\n")


def run(args: argparse.Namespace, steps: list[Step], manifest_days: list[Any],
        work: Path) -> int:
    """The whole ``--s3`` scenario; called by ``tools/bench`` with its corpus."""
    t_start = time.monotonic()
    res = Results()
    info: dict[str, Any] = res.info
    info["load_start"] = loadavg()
    info["allocated_bytes"] = manifest_days[0].allocated_bytes
    read_day = manifest_days[min(1, len(steps) - 1)]
    info["read_data_bytes"] = read_day.allocated_bytes
    info["read_size"] = os.path.getsize(steps[min(1, len(steps) - 1)].image)
    if len(steps) > 1:
        info["changed_bytes"] = manifest_days[1].changed_bytes
    info["scale_rps"] = args.scale_rps
    info["results"] = str(args.out / "results-s3.json")
    offsets = allocated_offsets(steps[min(1, len(steps) - 1)].image,
                                300 if args.quick else 2000, args.seed)
    server = Server(work)
    try:
        if not args.no_wan:
            server.start_proxy(RTT_MS)
        for rnd in range(args.runs):
            log(f"s3 round {rnd + 1}/{args.runs} (load {loadavg():.2f})")
            bucket = round_loopback(server, work, steps, res, offsets, info)
            if not args.no_wan:
                round_wan(server, work, steps, res, bucket, info)
            save(args, res, info, time.monotonic() - t_start)
        if args.scale_rps:
            log(f"s3 scale: {args.scale_rps} restore points")
            measure_scale(server, work, args.scale_rps, max(3, args.runs), res)
    finally:
        server.close()
    s = save(args, res, info, time.monotonic() - t_start)
    print(json.dumps(s, indent=1, default=str))
    print(render(res, info, s, args.argv, time.monotonic() - t_start))
    shutil.rmtree(work, ignore_errors=True)
    return 0


def save(args: argparse.Namespace, res: Results, info: dict[str, Any],
         elapsed: float) -> dict[str, Any]:
    s = summary(res, info)
    info["load_end"] = loadavg()
    (args.out / "results-s3.json").write_text(json.dumps(
        {"samples": res.samples, "info": info, "summary": s}, indent=1, default=str))
    if not args.quick or any(a.startswith("--doc") for a in args.argv):
        write_doc(args.doc, render(res, info, s, args.argv, elapsed))  # quick: only if asked
    return s


def rerender(results: Path, doc: Path, argv: list[str], elapsed_min: float) -> None:
    """The report again from ``results-s3.json`` (after a change of wording, not of figures)."""
    raw = json.loads(results.read_text())
    res = Results(samples=raw["samples"], info=raw["info"])
    s = summary(res, res.info)
    block = render(res, res.info, s, argv, elapsed_min * 60)
    write_doc(doc, block)


def main() -> int:
    if len(sys.argv) == 5 and sys.argv[1] == "build-scale":
        build_scale(sys.argv[2], int(sys.argv[3]), sys.argv[4])
        return 0
    if len(sys.argv) >= 5 and sys.argv[1] == "render":  # render RESULTS DOC MINUTES ARGV...
        rerender(Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[5:], float(sys.argv[4]))
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
