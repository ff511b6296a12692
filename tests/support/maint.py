"""Helpers of the maintenance tests: the real CLI, images, damage, real FUSE mounts.

The CLI, image and mount helpers are in :mod:`tests.support.helpers`; this
module adds what only the maintenance and fault tests need.
"""

from __future__ import annotations

import contextlib
import random
import signal
import subprocess
import time
from pathlib import Path

MiB = 1 << 20


def noise(n: int, seed: int) -> bytes:
    """Incompressible, reproducible bytes."""
    return random.Random(seed).randbytes(n)


def flip_byte(path: Path | str, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))


# -- in-process views of a repository -------------------------------------------------


def read_disk(repo_path: Path, vm: str, rp_id: str, disk: str = "d0") -> bytes:
    """A restore point's disk bytes through the same reader the mount uses."""
    from repofs.read.diskread import ChunkCache, DiskReader
    from repofs.store.repository import Repository

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
    from repofs.read.diskread import ChunkCache, DiskReader
    from repofs.store.repository import Repository

    if offset < 0:
        size, offset = size + offset, 0
    with Repository.open(str(repo_path)) as repo:
        info = repo.resolve(vm, rp_id).disk(disk)
        assert info is not None
        return DiskReader(repo, info, ChunkCache(repo, 8 * MiB)).read(offset, size)


def rp_ids(repo_path: Path, vm: str | None = None) -> list[str]:
    from repofs.store.repository import Repository

    with Repository.open(str(repo_path)) as repo:
        return [rp.id for rp in repo.restore_points(vm)]


def chunk_record(
    repo_path: Path, vm: str, rp_id: str, offset: int, disk: str = "d0"
) -> tuple[Path, int, int]:
    """(pack file, record offset, stored length) of the chunk holding ``offset`` of a disk."""
    from repofs.store.records import RecordType
    from repofs.store.repository import Repository

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


# -- fast in-process setup (the CLI paths are tested on their own) ----------------------


def new_repo(path: Path, chunk_size: int = 64 * 1024) -> Path:
    from repofs.store.repository import Repository

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
    from ingest.formats.detect import open_source
    from ingest.pipeline import DiskRequest, Ingest
    from repofs.store.lock import repository_lock
    from repofs.store.repository import Repository

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
