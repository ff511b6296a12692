"""Helpers of the maintenance tests: the real CLI, images, damage, real FUSE mounts.

Kept apart from the main test helpers so the maintenance branch merges
without touching them; the subprocess and mount helpers follow the same
rules (the CLI as an administrator runs it; a mount is always unmounted).
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
MiB = 1 << 20


def cli_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO_ROOT)
    env.pop("REPOFS_TEST_PAUSE_BEFORE_COMMIT", None)
    env.pop("REPOFS_TEST_GC_DELAY", None)
    if extra:
        env.update(extra)
    return env


def cli_argv(*args: str | os.PathLike[str]) -> list[str]:
    return [sys.executable, "-m", "repofs", *map(str, args)]


def repofs(
    *args: str | os.PathLike[str],
    check: bool = True,
    timeout: float = 300,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run the real ``repofs`` CLI of this tree in a subprocess."""
    proc = subprocess.run(
        cli_argv(*args),
        capture_output=True,
        text=True,
        timeout=timeout,
        env=cli_env(env),
        stdin=subprocess.DEVNULL,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"repofs {' '.join(map(str, args))} failed ({proc.returncode}):\n"
            f"{proc.stdout}\n{proc.stderr}"
        )
    return proc


def spawn(
    *args: str | os.PathLike[str], env: dict[str, str] | None = None
) -> subprocess.Popen[str]:
    """Start the CLI without waiting (for races and kills)."""
    return subprocess.Popen(
        cli_argv(*args),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=cli_env(env),
        stdin=subprocess.DEVNULL,
    )


def ingest(repo: Path, vm: str, *disks: str, env: dict[str, str] | None = None) -> str:
    """Ingest through the CLI and return the new restore point id (the last line of stdout)."""
    return repofs("ingest", repo, "--vm", vm, *disks, env=env).stdout.strip().splitlines()[-1]


def assert_one_line_error(proc: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert proc.returncode != 0, proc.stdout
    errors = [ln for ln in proc.stderr.strip().splitlines() if ln.startswith("repofs: error: ")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]


def make_image(path: Path, size: int, writes: list[tuple[int, bytes]] | None = None) -> Path:
    """A sparse raw image of ``size`` bytes with ``writes`` placed at their offsets."""
    with open(path, "wb") as f:
        f.truncate(size)
        for offset, data in writes or []:
            f.seek(offset)
            f.write(data)
    return path


def noise(n: int, seed: int) -> bytes:
    """Incompressible, reproducible bytes."""
    return random.Random(seed).randbytes(n)


def flip_byte(path: Path | str, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))


def qemu_compare(a: Path | str, b: Path | str) -> None:
    proc = subprocess.run(
        ["qemu-img", "compare", "-f", "raw", str(a), str(b)], capture_output=True, text=True
    )
    assert proc.returncode == 0 and "identical" in proc.stdout, proc.stdout + proc.stderr


# -- in-process views of a repository -------------------------------------------------


def read_disk(repo_path: Path, vm: str, rp_id: str, disk: str = "d0") -> bytes:
    """A restore point's disk bytes through the same reader the mount uses."""
    from repofs.diskread import ChunkCache, DiskReader
    from repofs.repository import Repository

    with Repository.open(str(repo_path)) as repo:
        rp = repo.resolve(vm, rp_id)
        info = rp.disk(disk)
        assert info is not None
        reader = DiskReader(repo, info, ChunkCache(repo, 8 * MiB))
        return reader.read(0, info.capacity)


def read_range(
    repo_path: Path, vm: str, rp_id: str, offset: int, size: int, disk: str = "d0"
) -> bytes:
    """Bytes ``[offset, offset+size)`` of a restore point's disk (offset clipped at 0)."""
    from repofs.diskread import ChunkCache, DiskReader
    from repofs.repository import Repository

    if offset < 0:
        size, offset = size + offset, 0
    with Repository.open(str(repo_path)) as repo:
        info = repo.resolve(vm, rp_id).disk(disk)
        assert info is not None
        return DiskReader(repo, info, ChunkCache(repo, 8 * MiB)).read(offset, size)


def rp_ids(repo_path: Path, vm: str | None = None) -> list[str]:
    from repofs.repository import Repository

    with Repository.open(str(repo_path)) as repo:
        return [rp.id for rp in repo.restore_points(vm)]


def chunk_record(
    repo_path: Path, vm: str, rp_id: str, offset: int, disk: str = "d0"
) -> tuple[Path, int, int]:
    """(pack file, record offset, stored length) of the chunk holding ``offset`` of a disk."""
    from repofs.records import RecordType
    from repofs.repository import Repository

    with Repository.open(str(repo_path)) as repo:
        info = repo.resolve(vm, rp_id).disk(disk)
        assert info is not None
        ref = repo.map_reader(info).ref_at(offset // repo.config.chunk_size)
        loc = repo.index.locate(RecordType.CHUNK, ref)
        assert loc is not None
        return Path(repo.packs.path_of(loc.pack_id)), loc.offset, loc.stored_len


def pack_files(repo_path: Path) -> list[Path]:
    return sorted((repo_path / "packs").glob("??/*.pack"))


# -- real FUSE mounts ----------------------------------------------------------------


def is_mounted(mountpoint: Path) -> bool:
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == str(mountpoint) for line in f)


def _daemon_pids(mountpoint: Path) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if (
            b"mount" in argv
            and str(mountpoint).encode() in argv
            and any(b"repofs" in a for a in argv)
        ):
            pids.append(int(entry))
    return pids


def unmount(mountpoint: Path) -> None:
    """Always leaves the mount point unmounted: -u, then -uz, then kill the daemon."""
    for args in (["-u"], ["-uz"]):
        if not is_mounted(mountpoint):
            break
        subprocess.run(["fusermount3", *args, str(mountpoint)], capture_output=True)
        for _ in range(50):
            if not is_mounted(mountpoint):
                break
            time.sleep(0.1)
    deadline = time.monotonic() + 10
    while _daemon_pids(mountpoint) and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid in _daemon_pids(mountpoint):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@contextlib.contextmanager
def mounted(repo: Path, mountpoint: Path, *extra: str) -> Iterator[Path]:
    """A real FUSE mount through the real CLI, logging to ``<mountpoint>.log``; always unmounted."""
    mountpoint.mkdir(exist_ok=True)
    log = mountpoint.parent / f"{mountpoint.name}.log"
    try:
        repofs("mount", repo, mountpoint, "--log", log, *extra, timeout=60)
        assert is_mounted(mountpoint), "mount returned but nothing is mounted"
        yield mountpoint
    finally:
        unmount(mountpoint)
        if log.exists() and "Traceback" in log.read_text():
            raise AssertionError(f"daemon log has a traceback:\n{log.read_text()}")


# -- fast in-process setup (the CLI paths are tested on their own) ----------------------


def new_repo(path: Path, chunk_size: int = 64 * 1024) -> Path:
    from repofs.repository import Repository

    Repository.init(str(path), chunk_size, "zstd:3").close()
    return path


def ingest_here(
    repo_path: Path,
    vm: str,
    disks: dict[str, Path],
    *,
    configs: tuple[Path, ...] = (),
    changed: dict[str, list[tuple[int, int]]] | None = None,
    now: float | None = None,
) -> str:
    """Ingest in this process, like the CLI does (shared lock, latest as parent); returns the id.

    ``changed`` gives byte extents per disk for a CBT ingest against the latest restore point.
    """
    from ingest.detect import open_source
    from ingest.pipeline import DiskRequest, Ingest
    from repofs.lock import repository_lock
    from repofs.repository import Repository

    with Repository.open(str(repo_path)) as repo:
        requests = [
            DiskRequest(name, open_source(str(path)), (changed or {}).get(name))
            for name, path in disks.items()
        ]
        try:
            with repository_lock(str(repo_path), exclusive=False):
                job = Ingest(
                    repo,
                    vm,
                    requests,
                    [str(c) for c in configs],
                    parent=repo.latest(vm),
                    progress=False,
                    threads=2,
                )
                return job.run(now).id
        finally:
            for r in requests:
                r.source.close()


def kill9(proc: subprocess.Popen[str]) -> None:
    """SIGKILL a spawned command and reap it, closing its pipes."""
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGKILL)
    proc.communicate()


def wait_for_line(proc: subprocess.Popen[str], needle: str, timeout: float = 60) -> None:
    """Read the child's stderr until ``needle`` shows up (fault hooks announce themselves)."""
    assert proc.stderr is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if needle in line:
            return
        if not line and proc.poll() is not None:
            raise AssertionError(f"process ended ({proc.returncode}) before {needle!r}")
    raise AssertionError(f"no {needle!r} within {timeout} s")
