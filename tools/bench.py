#!/usr/bin/env python3
"""repofs against BorgBackup and restic on one corpus, plus the machine's own limits.

Run through ``tools/bench`` (root, Debian).  Every figure is the median of
``--runs`` rounds; in each round the tools run one after the other in a
rotated order, so that drift in the machine's load hits all of them alike.
The results go into ``docs/performance.md`` between the ``bench:begin`` and
``bench:end`` markers (the prose around them is kept) and the chunk-size
plot into ``docs/chunk-size.png``.  ``--quick`` uses a tiny corpus and one
round, for smoke tests; its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
sys.path.insert(0, str(ROOT))

MiB = 1 << 20
GiB = 1 << 30
PY = sys.executable
PEER_ENV = {
    "BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK": "yes",
    "BORG_RELOCATED_REPO_ACCESS_IS_OK": "yes",
    "BORG_PASSPHRASE": "",
    "RESTIC_PASSWORD": "bench",
}
BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"

from repofs.store.config import DEFAULT_CHUNK, size_label  # noqa: E402  (after sys.path)
from repofs.store.crypto import DEFAULT_CIPHER  # noqa: E402

# repofs repositories are encrypted by default, as restic's are: the benchmark measures
# the default, with a passphrase from the environment like any unattended job.
os.environ.setdefault("REPOFS_PASSPHRASE", "bench")

DEFAULT_CS = size_label(DEFAULT_CHUNK)


def log(msg: str) -> None:
    print(f"bench: {msg}", file=sys.stderr, flush=True)


# -- processes and measurements -----------------------------------------------------------


@dataclass
class Ran:
    wall: float
    rss_kb: int
    out: str


def run(cmd: list[str], *, cwd: str | None = None, check: bool = True,
        env: dict[str, str] | None = None) -> Ran:
    """Run ``cmd``; its wall time and output."""
    full_env = {**os.environ, **PEER_ENV, "PYTHONPATH": str(ROOT), **(env or {})}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, env=full_env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate()
    wall = time.perf_counter() - t0
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {err.strip()[-2000:]}")
    return Ran(wall, 0, out)


def timed_rss(cmd: list[str], *, cwd: str | None = None,
              env: dict[str, str] | None = None) -> Ran:
    """Like :func:`run`, with the peak RSS of exactly this command (via GNU-time-like wait4)."""
    full_env = {**os.environ, **PEER_ENV, "PYTHONPATH": str(ROOT), **(env or {})}
    t0 = time.perf_counter()
    pid = os.fork()
    if pid == 0:
        try:
            os.chdir(cwd or os.getcwd())
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            err = os.open("/tmp/repofs-bench-last.err", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(err, 2)
            os.execvpe(cmd[0], cmd, full_env)
        finally:
            os._exit(127)
    _pid, status, usage = os.wait4(pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        msg = Path("/tmp/repofs-bench-last.err").read_text()[-2000:]
        raise RuntimeError(f"{' '.join(cmd)} failed: {msg}")
    return Ran(wall, usage.ru_maxrss, "")


def drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3")


def du(path: str | Path) -> int:
    """Bytes the tree occupies on disk (allocated blocks, so sparse LMDB maps count as used)."""
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
    return total


def loadavg() -> float:
    return os.getloadavg()[0]


def wait_for_idle(limit: float, max_wait: float) -> float:
    """Wait (up to ``max_wait`` s) until the 1-minute load average is below ``limit``."""
    t0 = time.monotonic()
    while loadavg() > limit and time.monotonic() - t0 < max_wait:
        time.sleep(10)
    return loadavg()


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def read_through(path: str, drop: bool, direct: bool = False) -> float:
    """Sequential read of a whole file with dd bs=1M (``direct``: iflag=direct); MB/s."""
    if drop:
        drop_caches()
    size = os.path.getsize(path)
    t0 = time.perf_counter()
    flags = ["iflag=direct"] if direct else []
    subprocess.run(["dd", f"if={path}", "of=/dev/null", "bs=1M", *flags], check=True,
                   capture_output=True)
    return size / (time.perf_counter() - t0) / 1e6


def random_reads(path: str, offsets: list[int]) -> dict[str, float]:
    """4 KiB preads at ``offsets`` (readahead off: POSIX_FADV_RANDOM); latencies in ms."""
    t0 = time.perf_counter()
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        lat = []
        for off in offsets:
            a = time.perf_counter()
            data = os.pread(fd, 4096, off)
            lat.append((time.perf_counter() - a) * 1e3)
            if len(data) != 4096:
                raise RuntimeError(f"short read at {off}")
            if len(lat) == 1:
                first = (time.perf_counter() - t0) * 1e3
    finally:
        os.close(fd)
    lat.sort()
    return {"p50": lat[len(lat) // 2], "p99": lat[int(len(lat) * 0.99)], "first": first}


def allocated_offsets(image: str, n: int, seed: int) -> list[int]:
    """``n`` random 4 KiB-aligned offsets inside the image's data (not its holes)."""
    from ingest.formats.raw import RawSource

    with RawSource(image) as src:
        extents = [(o, ln) for o, ln in src.allocated_extents() if ln >= 4096]
    weights = [ln for _o, ln in extents]
    rng = random.Random(seed)
    out = []
    for o, ln in rng.choices(extents, weights=weights, k=n):
        out.append(o + rng.randrange(ln // 4096) * 4096)
    return out


def vm_rss_kb(pid: int) -> int:
    """VmHWM (peak RSS) of a live process, in KiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


# -- the tools ------------------------------------------------------------------------------


@dataclass
class Step:
    image: str
    cbt: str | None


class Tool:
    name = ""

    def __init__(self, work: Path) -> None:
        self.work = work / self.name
        self.repo = self.work / "repo"
        self.mnt = self.work / "mnt"

    def reset(self) -> None:
        with contextlib.suppress(Exception):
            self.unmount()
        shutil.rmtree(self.work, ignore_errors=True)
        self.mnt.mkdir(parents=True)

    def unmount(self) -> None:
        if os.path.ismount(self.mnt):
            subprocess.run(["fusermount3", "-u", str(self.mnt)], capture_output=True)
            if os.path.ismount(self.mnt):
                subprocess.run(["fusermount3", "-uz", str(self.mnt)], capture_output=True)

    @contextlib.contextmanager
    def mounted(self, step_index: int, *options: str) -> Iterator[tuple[str, int]]:
        """The exposed disk of backup ``step_index`` through a fresh mount, and the daemon's pid."""
        proc, path = self._mount(step_index, *options)
        try:
            deadline = time.monotonic() + 120
            while not os.path.exists(path):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{self.name} mount failed: {proc.stderr.read()[-500:]}")
                time.sleep(0.05)
            yield path, proc.pid
        finally:
            self.unmount()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def _popen(self, cmd: list[str]) -> subprocess.Popen[str]:
        env = {**os.environ, **PEER_ENV, "PYTHONPATH": str(ROOT)}
        return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True)

    def _source_link(self, image: str) -> str:
        """The image under one stable path, so peers see "the same file, changed"."""
        src = self.work / "src"
        src.mkdir(exist_ok=True)
        link = src / "disk0.img"
        with contextlib.suppress(FileNotFoundError):
            link.unlink()
        os.link(image, link)
        return str(link)


class Repofs(Tool):
    name = "repofs"

    def __init__(self, work: Path, chunk_size: str = DEFAULT_CS, name: str = "repofs",
                 encryption: str = DEFAULT_CIPHER) -> None:
        self.name = name
        super().__init__(work)
        self.chunk_size = chunk_size
        self.encryption = encryption
        self.ids: list[str] = []

    def cli(self, *args: str) -> list[str]:
        return [PY, "-m", "repofs", *args]

    def init(self) -> None:
        run(self.cli("init", "--chunk-size", self.chunk_size, "--encryption", self.encryption,
                     str(self.repo)))

    def backup(self, step: Step, use_cbt: bool) -> Ran:
        args = ["ingest", str(self.repo), "--vm", "vm1", f"disk0={step.image}"]
        if use_cbt and step.cbt:
            args += ["--changed-blocks", f"disk0={step.cbt}"]
        r = timed_rss(self.cli(*args))
        return r

    def _mount(self, step_index: int, *options: str) -> tuple[subprocess.Popen[str], str]:
        proc = self._popen(self.cli("mount", "--foreground", *options, str(self.repo),
                                    str(self.mnt)))
        rps = sorted(self.repo_rps())
        return proc, str(self.mnt / "vm1" / rps[step_index] / "disk0-flat.vmdk")

    def repo_rps(self) -> list[str]:
        out = run(self.cli("list", str(self.repo), "vm1", "--json")).out
        return [rp["id"] for rp in json.loads(out)]


class Borg(Tool):
    name = "borg"

    def init(self) -> None:
        run(["borg", "init", "-e", "none", str(self.repo)])
        self.n = 0

    def backup(self, step: Step, use_cbt: bool) -> Ran:
        link = self._source_link(step.image)
        r = timed_rss(["borg", "create", "--compression", "zstd,3",
                       f"{self.repo}::step{self.n}", "disk0.img"], cwd=os.path.dirname(link))
        self.n += 1
        return r

    def _mount(self, step_index: int, *options: str) -> tuple[subprocess.Popen[str], str]:
        proc = self._popen(["borg", "mount", *options, "-f", f"{self.repo}::step{step_index}",
                            str(self.mnt)])
        return proc, str(self.mnt / "disk0.img")


class Restic(Tool):
    name = "restic"

    def init(self) -> None:
        run(["restic", "-r", str(self.repo), "init", "--repository-version", "2"])
        self.snaps: list[str] = []

    def backup(self, step: Step, use_cbt: bool) -> Ran:
        link = self._source_link(step.image)
        r = timed_rss(["restic", "-r", str(self.repo), "backup", "--quiet", link])
        out = run(["restic", "-r", str(self.repo), "snapshots", "--json"]).out
        self.snaps = [s["short_id"] for s in sorted(json.loads(out), key=lambda s: s["time"])]
        return r

    def _mount(self, step_index: int, *options: str) -> tuple[subprocess.Popen[str], str]:
        proc = self._popen(["restic", "-r", str(self.repo), "mount", *options, str(self.mnt)])
        link = self.work / "src" / "disk0.img"
        return proc, str(self.mnt / "ids" / self.snaps[step_index] / str(link).lstrip("/"))


# -- the benchmark ------------------------------------------------------------------------------


@dataclass
class Results:
    samples: dict[str, list[float]] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    def add(self, key: str, value: float) -> None:
        self.samples.setdefault(key, []).append(value)

    def med(self, key: str) -> float:
        return median(self.samples.get(key, []))


def ingest_reads(src: Any, chunk_size: int) -> Iterator[tuple[int, int]]:
    """The reads a full ingest makes of ``src``: its allocated chunks in ingest's batches."""
    from ingest.pipeline import BATCH_BYTES

    per_batch = max(1, BATCH_BYTES // chunk_size)
    capacity = src.size
    last = -1  # the chunk last yielded: extents that share a chunk read it once
    for off, ln in src.allocated_extents():
        first = max(off // chunk_size, last + 1)
        end = -(-(off + ln) // chunk_size)
        for c in range(first, end, per_batch):
            k = min(per_batch, end - c)
            yield c * chunk_size, min(k * chunk_size, capacity - c * chunk_size)
        last = max(last, end - 1)


def measure_ingest_limits(image: str, res: Results) -> None:
    """The ingest limit, read the way ingest reads: O_DIRECT on several threads, cold.

    Measured twice: the read alone, and the read feeding BLAKE3 + zstd -3 of
    every chunk on every core (ingest's work without the index and the
    packs).  The first is what the disk allows, the second what the disk
    and the CPU allow together; an ingest can be no faster than either.
    """
    from concurrent.futures import Future, ThreadPoolExecutor

    import blake3
    import zstandard

    from ingest.formats.raw import RawSource

    cs = DEFAULT_CHUNK
    drop_caches()
    t0 = time.perf_counter()
    got = 0
    with RawSource(image) as src:
        for data in src.read_sequence(ingest_reads(src, cs)):
            got += len(data)
    res.add("limit_read_MBps", got / (time.perf_counter() - t0) / 1e6)
    res.info["allocated_bytes"] = got

    cores = os.cpu_count() or 1
    local = threading.local()

    def work(batch: bytes) -> int:
        z = getattr(local, "z", None) or zstandard.ZstdCompressor(level=3)
        local.z = z
        view = memoryview(batch)
        for i in range(0, len(batch), cs):
            piece = view[i : i + cs]
            blake3.blake3(piece).digest()
            z.compress(piece)
        return len(batch)

    drop_caches()
    t0 = time.perf_counter()
    done = 0
    pending: collections.deque[Future[int]] = collections.deque()
    with RawSource(image) as src, ThreadPoolExecutor(cores) as ex:
        for data in src.read_sequence(ingest_reads(src, cs)):
            pending.append(ex.submit(work, data))
            while len(pending) > cores * 2 + 2:  # ingest's bound on batches in flight
                done += pending.popleft().result()
        while pending:
            done += pending.popleft().result()
    res.add("limit_read_hashzstd_MBps", done / (time.perf_counter() - t0) / 1e6)


def measure_limits(image: str, res: Results, sample_bytes: int) -> None:
    """The plain limits: read the image's data as ingest does, hash and compress it."""
    import blake3
    import zstandard

    from ingest.formats.raw import RawSource

    measure_ingest_limits(image, res)
    data = bytearray()
    with RawSource(image) as src:
        for off, ln in src.allocated_extents():
            data += src.read(off, min(ln, sample_bytes - len(data)))
            if len(data) >= sample_bytes:
                break
    cs = DEFAULT_CHUNK
    chunks = [bytes(data[i:i + cs]) for i in range(0, len(data), cs)]
    n = len(data)
    t0 = time.perf_counter()
    for c in chunks:
        blake3.blake3(c).digest()
    res.add("limit_blake3_MBps", n / (time.perf_counter() - t0) / 1e6)
    cctx = zstandard.ZstdCompressor(level=3)
    t0 = time.perf_counter()
    comp = [cctx.compress(c) for c in chunks]
    res.add("limit_zstd3_MBps", n / (time.perf_counter() - t0) / 1e6)
    dctx = zstandard.ZstdDecompressor()
    t0 = time.perf_counter()
    for c in comp:
        dctx.decompress(c, max_output_size=cs)
    res.add("limit_unzstd_MBps", n / (time.perf_counter() - t0) / 1e6)
    # hash + compress on every core: the CPU part of an ingest with nothing else in the way
    from concurrent.futures import ThreadPoolExecutor

    cores = os.cpu_count() or 1
    local = threading.local()

    def work(part: list[bytes]) -> None:
        z = getattr(local, "z", None) or zstandard.ZstdCompressor(level=3)
        local.z = z
        for c in part:
            blake3.blake3(c).digest()
            z.compress(c)

    parts = [chunks[i::cores] for i in range(cores)]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(cores) as ex:
        list(ex.map(work, parts))
    res.add("limit_hashzstd_all_MBps", n / (time.perf_counter() - t0) / 1e6)


def measure_passthrough(image: str, res: Results, work: Path) -> None:
    mnt = work / "passthrough"
    mnt.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([PY, str(ROOT / "tools" / "bench_passthrough.py"), image, str(mnt)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != "ready":
            raise RuntimeError(f"pass-through mount failed: {proc.stderr.read()[-500:]}")
        path = str(mnt / "disk.img")
        res.add("passthrough_cold_MBps", read_through(path, drop=True))
        res.add("passthrough_direct_cold_MBps", read_through(path, drop=True, direct=True))
        subprocess.run(["cat", image], stdout=subprocess.DEVNULL, check=True)  # image cached
        res.add("passthrough_direct_warm_MBps", read_through(path, drop=False, direct=True))
        subprocess.run(["fusermount3", "-u", str(mnt)], check=True)
        proc.wait(30)
        proc = subprocess.Popen([PY, str(ROOT / "tools" / "bench_passthrough.py"), image,
                                 str(mnt)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
        assert proc.stdout is not None
        proc.stdout.readline()
        res.add("passthrough_warm_MBps", read_through(path, drop=False))
    finally:
        if os.path.ismount(mnt):
            subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True)
        proc.wait(30)


def bench_tool(tool: Tool, steps: list[Step], res: Results, offsets: list[int],
               read_step: int) -> None:
    """One round for one tool: full backup, incrementals, sizes, mount reads, RSS."""
    n = tool.name
    tool.reset()
    tool.init()
    drop_caches()
    r = tool.backup(steps[0], use_cbt=False)
    res.add(f"{n}.full_s", r.wall)
    res.add(f"{n}.full_rss_MB", r.rss_kb / 1024)
    res.add(f"{n}.bytes_step0", du(tool.repo))
    for k, step in enumerate(steps[1:], start=1):
        drop_caches()
        r = tool.backup(step, use_cbt=True)
        res.add(f"{n}.incr{k}_s", r.wall)
        res.add(f"{n}.incr_rss_MB", r.rss_kb / 1024)
        res.add(f"{n}.bytes_step{k}", du(tool.repo))
    # sequential read: cold (fresh mount, caches dropped), then warm (same mount)
    with tool.mounted(read_step) as (path, pid):
        res.add(f"{n}.seq_cold_MBps", read_through(path, drop=True))
        res.add(f"{n}.seq_warm_MBps", read_through(path, drop=False))
        res.add(f"{n}.mount_rss_MB", vm_rss_kb(pid) / 1024)
    # the daemon's own speed: a fresh mount (empty chunk cache, nothing of the file in the
    # kernel's page cache) over repository files that the previous reads left cached
    with tool.mounted(read_step) as (path, pid):
        res.add(f"{n}.seq_hot_MBps", read_through(path, drop=False))
    # a reader that opens with O_DIRECT (every FUSE mount honours it): no page cache
    with tool.mounted(read_step) as (path, pid):
        res.add(f"{n}.seq_direct_MBps", read_through(path, drop=True, direct=True))
    if isinstance(tool, Repofs):  # the same for plain readers: repofs mount --direct-io
        with tool.mounted(read_step, "--direct-io") as (path, pid):
            res.add(f"{n}.seq_dio_mount_MBps", read_through(path, drop=True))
    drop_caches()
    with tool.mounted(read_step) as (path, pid):
        lat = random_reads(path, offsets)
        for key, v in lat.items():
            res.add(f"{n}.rand_{key}_ms", v)


def bench_repofs_nocbt(steps: list[Step], work: Path, res: Results) -> None:
    """The same incremental without a changed-block list: read everything, dedup."""
    tool = Repofs(work, name="repofs-nocbt")
    tool.reset()
    tool.init()
    drop_caches()
    r = tool.backup(steps[0], use_cbt=False)
    res.add("repofs.full_s", r.wall)
    res.add("repofs.full_rss_MB", r.rss_kb / 1024)
    drop_caches()
    r = tool.backup(steps[1], use_cbt=False)
    res.add("repofs.incr1_nocbt_s", r.wall)
    res.add("repofs.bytes_step1_nocbt", du(tool.repo))
    shutil.rmtree(tool.work, ignore_errors=True)


def build_scale_repo(path: Path, count: int) -> None:
    """A repository with one VM of ``count`` restore points (cached between runs)."""
    marker = path / f".bench-{count}"
    if marker.exists():
        return
    shutil.rmtree(path, ignore_errors=True)
    from ingest.formats.raw import RawSource
    from ingest.pipeline import DiskRequest, Ingest
    from repofs.store.repository import Repository

    img = path.parent / f"{path.name}.img"
    rng = random.Random(7)
    with open(img, "wb") as f:
        f.write(rng.randbytes(4 * MiB))
    repo = Repository.init(str(path), DEFAULT_CHUNK, "zstd:3")
    base = 1_700_000_000
    try:
        for i in range(count):
            with open(img, "r+b") as f:
                f.seek(rng.randrange(4 * MiB // 4096) * 4096)
                f.write(rng.randbytes(4096))
            with RawSource(str(img)) as src:
                parent = repo.latest("vm1")
                Ingest(repo, "vm1", [DiskRequest("disk0", src)], [], parent=parent,
                       progress=False).run(now=base + i * 3600)
    finally:
        repo.close()
    img.unlink()
    marker.touch()


def measure_scale(repo: Path, work: Path, res: Results, prefix: str) -> None:
    mnt = work / f"scale-mnt-{prefix}"
    mnt.mkdir(parents=True, exist_ok=True)
    r = run([PY, "-m", "repofs", "mount", str(repo), str(mnt)])
    try:
        res.add(f"{prefix}.mount_ready_s", r.wall)
        t0 = time.perf_counter()
        out = subprocess.run(["ls", "-l", str(mnt / "vm1")], check=True, capture_output=True,
                             text=True).stdout
        res.add(f"{prefix}.ls_cold_ms", (time.perf_counter() - t0) * 1e3)
        res.info[f"{prefix}.ls_entries"] = len(out.splitlines()) - 1
        t0 = time.perf_counter()
        subprocess.run(["ls", "-l", str(mnt / "vm1")], check=True, capture_output=True)
        res.add(f"{prefix}.ls_warm_ms", (time.perf_counter() - t0) * 1e3)
    finally:
        run([PY, "-m", "repofs", "umount", str(mnt)], check=False)


def chunk_sweep(steps: list[Step], work: Path, sizes: list[str]) -> list[dict[str, Any]]:
    out = []
    for cs in sizes:
        tool = Repofs(work, chunk_size=cs, name=f"sweep-{cs}")
        tool.reset()
        tool.init()
        drop_caches()
        r = tool.backup(steps[0], use_cbt=False)
        full_s = r.wall
        for step in steps[1:]:
            tool.backup(step, use_cbt=True)
        stored = du(tool.repo)
        stats = json.loads(run([PY, "-m", "repofs", "stats", str(tool.repo), "--json"]).out)
        out.append({"chunk": cs, "full_s": full_s, "stored": stored, "stats": stats})
        shutil.rmtree(tool.work, ignore_errors=True)
        log(f"chunk {cs}: full {full_s:.1f} s, stored {stored / MiB:.0f} MiB")
    return out


def plot_sweep(sweep: list[dict[str, Any]], logical: int, data_bytes: int, path: Path,
               default: str = DEFAULT_CS) -> bool:
    try:
        import matplotlib
    except ImportError:
        subprocess.run([PY, "-m", "pip", "install", "-q", "matplotlib"], check=False)
        try:
            import matplotlib
        except ImportError:
            log("matplotlib unavailable: no plot")
            return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [s["chunk"] for s in sweep]
    ratio = [logical / s["stored"] for s in sweep]
    speed = [data_bytes / s["full_s"] / 1e6 for s in sweep]
    fig, ax1 = plt.subplots(figsize=(7, 4.2))
    x = range(len(labels))
    ax1.plot(x, ratio, "o-", color="tab:blue", label="dedup+compression ratio")
    ax1.set_ylabel("logical bytes / stored bytes", color="tab:blue")
    ax1.set_xticks(list(x), labels)
    ax1.set_xlabel("chunk size")
    ax2 = ax1.twinx()
    ax2.plot(x, speed, "s--", color="tab:red", label="full ingest MB/s")
    ax2.set_ylabel("full ingest, MB/s of data", color="tab:red")
    if default in labels:
        i = labels.index(default)
        ax1.axvline(i, color="grey", linestyle=":")
        ax1.annotate("default", (i, ratio[i]), textcoords="offset points", xytext=(6, 8))
    ax1.set_title("Chunk size trade-off (all restore points of the corpus)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


# -- report ---------------------------------------------------------------------------------


def machine_info() -> dict[str, str]:
    def cmd(*a: str) -> str:
        try:
            return subprocess.run(a, capture_output=True, text=True, check=False).stdout.strip()
        except OSError:
            return "missing"

    model = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    import blake3
    import pyfuse3
    import zstandard

    return {
        "cpu": f"{model}, {os.cpu_count()} cores",
        "memory": f"{mem / GiB:.0f} GiB",
        "kernel": platform.release(),
        "python": platform.python_version(),
        "libs": f"zstandard {zstandard.__version__}, blake3 {blake3.__version__}, "
                f"pyfuse3 {pyfuse3.__version__}",
        "borg": cmd("borg", "--version") or "not run",
        "restic": (cmd("restic", "version").split(" compiled")[0]) or "not run",
    }


def fmt(v: float, digits: int = 0) -> str:
    if v != v:  # nan
        return "-"
    return f"{v:,.{digits}f}"


def ratio(a: float, b: float) -> str:
    if a != a or b != b or b == 0:
        return "-"
    return f"{a / b:.1f}x"


def render(res: Results, args: argparse.Namespace, steps: list[Step], peers: list[str],
           sweep: list[dict[str, Any]], plotted: bool, elapsed: float) -> str:
    m = res.med
    info = res.info
    data = info.get("allocated_bytes", 0)
    tools = ["repofs", *peers]
    lines = [BEGIN, "", f"Generated by `tools/bench {' '.join(args.argv)}` "
             f"in {elapsed / 60:.0f} min; each figure is the median of {args.runs} round(s) "
             f"(tools alternating within a round).", ""]
    mi = info["machine"]
    lines += ["| machine | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in mi.items()]
    lines += [f"| load average | {info['load_start']:.2f} at start, "
              f"{info['load_end']:.2f} at end |", ""]
    lines += [f"Corpus: `tools/corpus.py --seed {args.seed} --size {args.size} --data "
              f"{args.data} --days {args.days} --vms 1` — one VM, {len(steps)} backups "
              f"(day 0 full, then {len(steps) - 1} daily incrementals with about "
              f"{info.get('change_pct', '?')} of chunks changed each); the first image holds "
              f"{data / MiB:,.0f} MiB of data in a {info.get('capacity', 0) / GiB:.0f} GiB "
              "sparse disk.", ""]
    cols = tools + [f"repofs vs {p}" for p in peers]
    lines += ["| figure | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]

    def row(label: str, key: str, digits: int = 1, better: str = "low",
            scale: float = 1.0) -> None:
        vals = [m(f"{t}.{key}") * scale for t in tools]
        rs = []
        for pv in vals[1:]:
            rs.append(ratio(pv, vals[0]) if better == "low" else ratio(vals[0], pv))
        lines.append("| " + " | ".join([label, *(fmt(v, digits) for v in vals), *rs]) + " |")

    row("full ingest, s", "full_s")
    full = {t: m(f"{t}.full_s") for t in tools}
    lines.append("| " + " | ".join(["full ingest, MB/s of image data",
                                    *(fmt(data / full[t] / 1e6, 0) for t in tools),
                                    *(ratio(full[p], full["repofs"]) for p in peers)]) + " |")
    for k in range(1, len(steps)):
        row(f"incremental day {k}, s (repofs: with changed-block list)", f"incr{k}_s", 2)
    lines.append("| " + " | ".join(["incremental day 1 without changed-block list, s",
                                    fmt(m("repofs.incr1_nocbt_s"), 2),
                                    *("-" for _ in peers), *("-" for _ in peers)]) + " |")
    for k in range(len(steps)):
        row(f"repository MiB after step {k}", f"bytes_step{k}", 1, scale=1 / MiB)
    row("sequential read through the mount, cold, MB/s", "seq_cold_MBps", 0, better="high")
    row("sequential read, fresh mount, repository files cached, MB/s", "seq_hot_MBps", 0,
        better="high")
    row("sequential read through the mount, warm, MB/s", "seq_warm_MBps", 0, better="high")
    row("sequential read, cold, reader opens with O_DIRECT (`dd iflag=direct`), MB/s",
        "seq_direct_MBps", 0, better="high")
    lines.append("| " + " | ".join(["sequential read, cold, `repofs mount --direct-io`, MB/s",
                                    fmt(m("repofs.seq_dio_mount_MBps"), 0),
                                    *("-" for _ in peers), *("-" for _ in peers)]) + " |")
    row("random 4 KiB read p50, ms (cold)", "rand_p50_ms", 2)
    row("random 4 KiB read p99, ms (cold)", "rand_p99_ms", 2)
    row("first byte after open, ms (cold)", "rand_first_ms", 2)
    row("ingest peak RSS, MB (full)", "full_rss_MB", 0)
    row("ingest peak RSS, MB (incremental)", "incr_rss_MB", 0)
    row("mount daemon peak RSS after reads, MB", "mount_rss_MB", 0)
    lines.append("")
    lines += ["Plain limits on the same data and machine:", "", "| limit | value |",
              "|---|---:|",
              f"| cold read of the image's data as ingest reads it (O_DIRECT, read-ahead "
              f"threads, 4 MiB batches), MB/s | {fmt(m('limit_read_MBps'))} |",
              f"| the same read feeding BLAKE3 + zstd -3 of every chunk on all "
              f"{os.cpu_count()} cores, MB/s | {fmt(m('limit_read_hashzstd_MBps'))} |",
              f"| BLAKE3, one thread, {DEFAULT_CHUNK // 1024} KiB pieces, MB/s | "
              f"{fmt(m('limit_blake3_MBps'))} |",
              f"| zstd -3, one thread, {DEFAULT_CHUNK // 1024} KiB pieces, MB/s | "
              f"{fmt(m('limit_zstd3_MBps'))} |",
              f"| zstd decompress, one thread, MB/s | {fmt(m('limit_unzstd_MBps'))} |",
              f"| BLAKE3 + zstd -3 on all {os.cpu_count()} cores, MB/s | "
              f"{fmt(m('limit_hashzstd_all_MBps'))} |",
              f"| pyfuse3 pass-through of the raw image, sequential, image cold, MB/s | "
              f"{fmt(m('passthrough_cold_MBps'))} |",
              f"| pyfuse3 pass-through of the raw image, sequential, image cached, MB/s | "
              f"{fmt(m('passthrough_warm_MBps'))} |",
              f"| the pass-through read with O_DIRECT, image cold, MB/s | "
              f"{fmt(m('passthrough_direct_cold_MBps'))} |",
              f"| the pass-through read with O_DIRECT, image cached, MB/s | "
              f"{fmt(m('passthrough_direct_warm_MBps'))} |", ""]
    read_s = data / (m("limit_read_MBps") * 1e6)
    both_s = data / (m("limit_read_hashzstd_MBps") * 1e6)
    info["limit_read_s"], info["limit_s"] = read_s, both_s
    full_s = m("repofs.full_s")
    lines += [f"Ingest limits, read the way ingest reads (O_DIRECT, read-ahead threads): the "
              f"read alone {read_s:.1f} s, the read with hash+compress of every chunk on all "
              f"cores {both_s:.1f} s. repofs full ingest {full_s:.1f} s = "
              f"**{full_s / read_s:.2f}x** the read and **{full_s / both_s:.2f}x** the "
              f"read with hash+compress.", ""]
    lines += ["Scale (one VM with many restore points, and the corpus repository):", "",
              "| figure | value |", "|---|---:|"]
    for prefix, label in (("scale", f"{args.scale_rps} restore points"),
                          ("big", "corpus repository")):
        if f"{prefix}.mount_ready_s" in res.samples:
            lines.append(f"| mount ready (`repofs mount` returns), {label}, s | "
                         f"{fmt(m(prefix + '.mount_ready_s'), 2)} |")
            lines.append(f"| `ls -l` of the VM directory, first after mount, {label}, ms | "
                         f"{fmt(m(prefix + '.ls_cold_ms'), 1)} |")
            lines.append(f"| `ls -l` again, {label}, ms | {fmt(m(prefix + '.ls_warm_ms'), 1)} |")
    lines.append("")
    if sweep:
        logical = info.get("logical_bytes", 1)
        lines += ["Chunk-size trade-off (one round; ratio = logical bytes of all restore points "
                  "/ repository bytes):", "", "| chunk | full ingest s | MB/s | repository MiB "
                  "| ratio |", "|---|---:|---:|---:|---:|"]
        for s in sweep:
            lines.append(f"| {s['chunk']} | {s['full_s']:.1f} | {data / s['full_s'] / 1e6:.0f} | "
                         f"{s['stored'] / MiB:.0f} | {logical / s['stored']:.2f} |")
        if plotted:
            lines += ["", "![chunk size trade-off](chunk-size.png)"]
        lines.append("")
    lines += ["Raw samples: `" + str(args.out / "results.json") + "`.", "", END]
    return "\n".join(lines)


def write_doc(path: Path, block: str) -> None:
    if path.exists():
        text = path.read_text()
        if BEGIN in text and END in text:
            a, b = text.index(BEGIN), text.index(END) + len(END)
            path.write_text(text[:a] + block + text[b:])
            return
    path.write_text("# Performance\n\n" + block + "\n")


# -- main ------------------------------------------------------------------------------------


def save(args: argparse.Namespace, res: Results, peers: list[str], steps: list[Step],
         sweep: list[dict[str, Any]], plotted: bool, elapsed: float) -> None:
    """Write the raw samples and the report; called after every round, so partial runs count."""
    res.info["load_end"] = loadavg()
    (args.out / "results.json").write_text(json.dumps(
        {"samples": res.samples, "info": res.info, "sweep": sweep}, indent=1, default=str))
    write_doc(args.doc, render(res, args, steps, peers, sweep, plotted, elapsed))


def ensure_peers() -> list[str]:
    missing = [p for p, exe in (("borgbackup", "borg"), ("restic", "restic"))
               if shutil.which(exe) is None]
    if missing:
        log(f"installing {' '.join(missing)}")
        subprocess.run(["apt-get", "install", "-y", "-qq", *missing], check=True,
                       env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
                       stdout=subprocess.DEVNULL)
    return ["borg", "restic"]


def limits_only(args: argparse.Namespace, step: Step, res: Results, work: Path) -> int:
    """The ingest limits beside a repofs full ingest of the same image, round after round.

    For checking the "x the limit" figure without the whole benchmark; the
    figures go to the log and to ``results-limits.json``, not to the report.
    """
    tool = Repofs(work)
    for rnd in range(args.runs):
        load = loadavg()
        measure_ingest_limits(step.image, res)
        tool.reset()
        tool.init()
        drop_caches()
        full_s = tool.backup(step, use_cbt=False).wall
        res.add("repofs.full_s", full_s)
        data = res.info["allocated_bytes"]
        read_s = data / (res.samples["limit_read_MBps"][-1] * 1e6)
        both_s = data / (res.samples["limit_read_hashzstd_MBps"][-1] * 1e6)
        log(f"round {rnd + 1}/{args.runs} (load {load:.2f} -> {loadavg():.2f}): "
            f"{data / MiB:.0f} MiB; read {read_s:.1f} s, read+hash+compress {both_s:.1f} s, "
            f"repofs full ingest {full_s:.1f} s = {full_s / read_s:.2f}x the read, "
            f"{full_s / both_s:.2f}x the read with hash+compress")
    (args.out / "results-limits.json").write_text(
        json.dumps({"samples": res.samples, "info": res.info}, indent=2))
    shutil.rmtree(work, ignore_errors=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny corpus, one round, for smoke tests")
    ap.add_argument("--out", type=Path, default=Path("/var/tmp/repofs-bench"),
                    help="work directory (corpus cache, repositories, raw results)")
    ap.add_argument("--runs", type=int, default=None, help="rounds (default 3, quick 1)")
    ap.add_argument("--no-peers", action="store_true", help="repofs and the limits only")
    ap.add_argument("--limits-only", action="store_true",
                    help="per round only the ingest limits and a repofs full ingest; print the "
                         "ratios, write no report")
    ap.add_argument("--s3", action="store_true",
                    help="only the object-storage scenario (tools/bench_s3.py): a SeaweedFS "
                         "bucket against a local directory")
    ap.add_argument("--no-wan", action="store_true",
                    help="--s3 without the runs through the 30 ms latency proxy")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--size", default=None, help="virtual disk size (default 8G)")
    ap.add_argument("--data", default=None, help="data in the first image (default 2G)")
    ap.add_argument("--days", type=int, default=None, help="daily incrementals (default 2)")
    ap.add_argument("--scale-rps", type=int, default=None, help="restore points (default 1000)")
    ap.add_argument("--sweep", default=None, help="chunk sizes for the plot, comma-separated")
    ap.add_argument("--doc", type=Path, default=ROOT / "docs" / "performance.md")
    ap.add_argument("--plot", type=Path, default=ROOT / "docs" / "chunk-size.png")
    ap.add_argument("--no-plot", action="store_true", help="skip the plot (no matplotlib)")
    ap.add_argument("--max-load", type=float, default=1.0,
                    help="wait (up to 10 min) for the load average to fall below this")
    args = ap.parse_args(argv)
    args.argv = argv
    q = args.quick
    args.runs = args.runs or (1 if q else 3)
    args.size = args.size or ("256M" if q else "8G")
    args.data = args.data or ("48M" if q else "2G")
    args.days = args.days if args.days is not None else (1 if q else 2)
    args.scale_rps = args.scale_rps if args.scale_rps is not None else (20 if q else 1000)
    sweep_sizes = (args.sweep or (f"{DEFAULT_CS},1M" if q else "16K,64K,128K,256K,1M")).split(",")
    if os.geteuid() != 0:
        log("needs root (loop devices for the corpus, drop_caches, FUSE)")
        return 1
    t_start = time.monotonic()
    args.out.mkdir(parents=True, exist_ok=True)
    work = args.out / "work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    peers = [] if args.no_peers or args.s3 else ensure_peers()

    import corpus

    corpus_days = max(args.days, 1 if q else 3)
    cdir = args.out / f"corpus-s{args.seed}-{args.size}-{args.data}-d{corpus_days}"
    log(f"corpus in {cdir}")
    manifest = corpus.generate(cdir, args.seed, corpus.parse_size(args.size),
                               corpus.parse_size(args.data), corpus_days, 1)
    vm = manifest.vms[0]
    steps = [Step(str(cdir / d.image), str(cdir / d.cbt) if d.cbt else None)
             for d in vm.days[: args.days + 1]]
    if args.s3:
        import bench_s3

        wait_for_idle(args.max_load, 0 if q else 600)
        return bench_s3.run(args, steps, vm.days[: args.days + 1], work)
    res = Results()
    res.info["machine"] = machine_info()
    res.info["capacity"] = os.path.getsize(steps[0].image)
    res.info["logical_bytes"] = sum(d.allocated_bytes for d in vm.days[: args.days + 1])
    changed = [d.changed_bytes / d.allocated_bytes for d in vm.days[1: args.days + 1]
               if d.changed_bytes is not None]
    res.info["change_pct"] = f"{100 * median(changed):.1f} %" if changed else "?"
    res.info["load_start"] = wait_for_idle(args.max_load, 0 if q else 600)
    offsets = allocated_offsets(steps[-1].image, 300 if q else 2000, args.seed)

    if args.limits_only:
        return limits_only(args, steps[0], res, work)
    for rnd in range(args.runs):
        log(f"round {rnd + 1}/{args.runs} (load {loadavg():.2f})")
        measure_limits(steps[0].image, res, (64 if q else 512) * MiB)
        measure_passthrough(steps[0].image, res, work)
        order: list[Callable[[], None]] = []
        tools: list[Tool] = [Repofs(work)]
        if "borg" in peers:
            tools.append(Borg(work))
        if "restic" in peers:
            tools.append(Restic(work))
        for t in tools:
            order.append(lambda t=t: bench_tool(t, steps, res, offsets, len(steps) - 1))
        if len(steps) > 1:
            order.append(lambda: bench_repofs_nocbt(steps, work, res))
        rot = rnd % len(order)
        for fn in order[rot:] + order[:rot]:
            fn()
        # the corpus repository: mount start-up and ls with few restore points, big data
        measure_scale(tools[0].repo, work, res, "big")
        for t in tools:
            shutil.rmtree(t.repo, ignore_errors=True)
        save(args, res, peers, steps, [], False, time.monotonic() - t_start)
    scale_repo = args.out / f"scale-{args.scale_rps}"
    log(f"scale repository with {args.scale_rps} restore points")
    build_scale_repo(scale_repo, args.scale_rps)
    for _ in range(max(3, args.runs)):
        measure_scale(scale_repo, work, res, "scale")

    sweep = chunk_sweep(steps, work, sweep_sizes) if sweep_sizes != [""] else []
    data = res.info.get("allocated_bytes", 1)
    plotted = bool(sweep) and not args.no_plot and plot_sweep(
        sweep, res.info["logical_bytes"], data, args.plot)
    elapsed = time.monotonic() - t_start
    save(args, res, peers, steps, sweep, plotted, elapsed)
    shutil.rmtree(work, ignore_errors=True)
    log(f"done in {elapsed:.0f} s: {args.doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
