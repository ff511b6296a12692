"""The on-disk record cache of a bucket's readers: bounded, shared by processes, never trusted."""

from __future__ import annotations

import hashlib
import multiprocessing
from pathlib import Path

from repofs.store.recordcache import RESCAN_FRACTION, RecordCache

KiB = 1 << 10


def record(pack: int, offset: int, size: int) -> bytes:
    """Bytes that say which (pack, offset) they belong to."""
    seed = hashlib.sha256(f"{pack}:{offset}".encode()).digest()
    return (seed * (size // len(seed) + 1))[:size]


def _fill(root: str, bound: int, worker: int, count: int) -> None:
    cache = RecordCache(root, bound)
    for i in range(count):
        cache.put(bytes([worker]) * 16, i * 64 * KiB, record(worker, i * 64 * KiB, 32 * KiB))
    assert cache.flush(30)


class TestRecordCache:
    def test_records_come_back_and_the_bound_holds(self, tmp_path: Path) -> None:
        """Writing four times the bound keeps the directory under it, recent records kept."""
        bound = 1024 * KiB
        cache = RecordCache(str(tmp_path / "chunks"), bound)
        for i in range(128):
            cache.put(b"p" * 16, i * 64 * KiB, record(0, i, 32 * KiB))
            if i % 16 == 15:
                assert cache.flush(10)
                assert cache.usage() <= bound
        assert cache.flush(10)
        assert 0 < cache.usage() <= bound
        assert cache.get(b"p" * 16, 127 * 64 * KiB, 32 * KiB) == record(0, 127, 32 * KiB)
        assert cache.get(b"p" * 16, 0, 32 * KiB) is None  # the oldest went first

    def test_a_file_of_the_wrong_length_is_a_miss_and_goes(self, tmp_path: Path) -> None:
        """A truncated cache file is never returned, and is removed."""
        cache = RecordCache(str(tmp_path / "chunks"), 1 << 20)
        cache.put(b"q" * 16, 0, record(1, 0, 4 * KiB))
        assert cache.flush(10)
        (path,) = [p for p in (tmp_path / "chunks").rglob("*") if p.is_file() and p.name != ".lock"]
        path.write_bytes(path.read_bytes()[:-1])
        assert cache.get(b"q" * 16, 0, 4 * KiB) is None
        assert not path.exists()

    def test_processes_share_the_directory(self, tmp_path: Path) -> None:
        """Four processes filling one small cache at once: bounded, every file whole and right."""
        root = str(tmp_path / "chunks")
        bound = 2048 * KiB
        ctx = multiprocessing.get_context("spawn")
        procs = [ctx.Process(target=_fill, args=(root, bound, w, 200)) for w in range(4)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(60)
            assert p.exitcode == 0
        files = [p for p in Path(root).rglob("*") if p.is_file() and p.name != ".lock"]
        assert files
        assert sum(p.stat().st_size for p in files) <= bound * (1 + 4 * RESCAN_FRACTION)
        for p in files:
            assert not p.name.endswith(".tmp"), p
            pack_hex, offset_hex = p.name.split("-")
            worker = bytes.fromhex(pack_hex)[0]
            assert p.read_bytes() == record(worker, int(offset_hex, 16), 32 * KiB)
