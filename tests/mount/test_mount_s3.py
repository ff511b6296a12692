"""Mounts of s3:// repositories on a real SeaweedFS server: bytes, other hosts, damage, cache."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from repofs.store.config import DEFAULT_CHUNK
from tests.support.helpers import (
    assert_one_line_error,
    ingest,
    is_mounted,
    make_image,
    qemu_compare,
    repofs,
    unmount,
)
from tests.support.s3server import S3Server

MiB = 1 << 20


def host_env(s3_env: dict[str, str], home: Path) -> dict[str, str]:
    """The environment of one simulated host: the server, and a cache directory of its own."""
    env = dict(s3_env)
    env["XDG_CACHE_HOME"] = str(home)
    env.pop("REPOFS_CACHE_DIR", None)
    return env


@contextlib.contextmanager
def s3_mounted(url: str, mountpoint: Path, env: dict[str, str], *extra: str) -> Iterator[Path]:
    """A real FUSE mount of a bucket through the real CLI, always unmounted afterwards."""
    mountpoint.mkdir(exist_ok=True)
    log = mountpoint.parent / f"{mountpoint.name}.log"
    try:
        repofs("mount", url, mountpoint, "--log", log, *extra, env=env, timeout=60)
        assert is_mounted(mountpoint), "mount returned but nothing is mounted"
        yield mountpoint
    finally:
        unmount(mountpoint)
        if log.exists() and "Traceback" in log.read_text():
            raise AssertionError(f"daemon log has a traceback:\n{log.read_text()}")


def random_image(path: Path, size: int) -> Path:
    """A disk of random bytes (every chunk unique) with a hole in the middle."""
    return make_image(
        path,
        size,
        [(0, os.urandom(size // 2 - MiB)), (size // 2 + MiB, os.urandom(size // 2 - MiB))],
    )


def read_blocks(path: Path, size: int, block: int) -> dict[int, bytes | int]:
    """Every ``block`` of ``path``: its bytes, or the errno its read failed with."""
    out: dict[int, bytes | int] = {}
    fd = os.open(path, os.O_RDONLY)
    try:
        for off in range(0, size, block):
            try:
                out[off] = os.pread(fd, block, off)
            except OSError as exc:
                out[off] = exc.errno or -1
    finally:
        os.close(fd)
    return out


@pytest.fixture
def s3_repo(
    tmp_path: Path, s3_url: str, s3_env: dict[str, str]
) -> tuple[str, dict[str, str], Path, str]:
    """An s3:// repository with one restore point of VM ``web``: (url, env, image, id)."""
    env = host_env(s3_env, tmp_path / "host-a")
    repofs("init", s3_url, env=env)
    img = random_image(tmp_path / "src.img", 12 * MiB)
    rp = ingest(s3_url, "web", f"disk0={img}", env=env)  # type: ignore[arg-type]
    return s3_url, env, img, rp


def _cache_of(env: dict[str, str]) -> Path:
    (only,) = (Path(env["XDG_CACHE_HOME"]) / "repofs").iterdir()
    return only


class TestMountS3:
    def test_flat_file_is_the_source(
        self, tmp_path: Path, s3_repo: tuple[str, dict[str, str], Path, str]
    ) -> None:
        """qemu-img compare finds the mounted flat file identical to the ingested image."""
        url, env, img, rp = s3_repo
        with s3_mounted(url, tmp_path / "mnt", env) as mnt:
            qemu_compare(img, mnt / "web" / rp / "disk0-flat.vmdk")

    def test_fresh_cache_dir_mounts_and_reads(
        self, tmp_path: Path, s3_repo: tuple[str, dict[str, str], Path, str]
    ) -> None:
        """With the host's cache directory deleted, a mount builds it again and reads right."""
        url, env, img, rp = s3_repo
        shutil.rmtree(_cache_of(env))
        with s3_mounted(url, tmp_path / "mnt", env, "--direct-io") as mnt:
            qemu_compare(img, mnt / "web" / rp / "disk0-flat.vmdk")

    def test_other_hosts_restore_points_come_and_go(
        self, tmp_path: Path, s3_repo: tuple[str, dict[str, str], Path, str]
    ) -> None:
        """Another host's new restore point appears within the refresh, its deletion removes it."""
        url, env, img, first = s3_repo
        other = host_env(env, tmp_path / "host-b")
        with s3_mounted(url, tmp_path / "mnt", env, "--refresh", "1") as mnt:
            assert sorted(os.listdir(mnt / "web")) == sorted([first, "latest"])
            with open(img, "r+b") as f:
                f.write(os.urandom(4096))
            second = ingest(url, "web", f"disk0={img}", env=other)  # type: ignore[arg-type]
            assert second != first
            deadline = time.monotonic() + 15
            while second not in os.listdir(mnt / "web"):
                assert time.monotonic() < deadline, "the new restore point never appeared"
                time.sleep(0.2)
            assert os.readlink(mnt / "web" / "latest") == second
            qemu_compare(img, mnt / "web" / second / "disk0-flat.vmdk")
            repofs("delete", url, "web", first, env=other)
            deadline = time.monotonic() + 15
            while first in os.listdir(mnt / "web") or (mnt / "web" / first).exists():
                # (a name the kernel looked up stays for its 1 s entry timeout)
                assert time.monotonic() < deadline, "the deleted restore point stayed"
                time.sleep(0.2)

    def test_inode_numbers_are_the_same_everywhere(
        self, tmp_path: Path, s3_repo: tuple[str, dict[str, str], Path, str]
    ) -> None:
        """VM dir, restore point dir and flat file keep their inodes on remount and other hosts."""
        url, env, _img, rp = s3_repo

        def inodes(e: dict[str, str], where: Path) -> list[int]:
            with s3_mounted(url, where, e) as mnt:
                paths = [mnt / "web", mnt / "web" / rp, mnt / "web" / rp / "disk0-flat.vmdk"]
                return [p.stat().st_ino for p in paths]

        first = inodes(env, tmp_path / "m1")
        assert inodes(env, tmp_path / "m2") == first
        assert inodes(host_env(env, tmp_path / "host-c"), tmp_path / "m3") == first

    def test_flipped_byte_is_eio_for_its_range_only(
        self,
        tmp_path: Path,
        s3_server: S3Server,
        s3_bucket: str,
        s3_repo: tuple[str, dict[str, str], Path, str],
    ) -> None:
        """A byte changed in a pack object fails the read covering it, logged; the rest reads."""
        url, env, img, rp = s3_repo
        client = s3_server.client()
        (pack,) = [
            o["Key"]
            for o in client.list_objects_v2(Bucket=s3_bucket, Prefix="repo/packs/")["Contents"]
        ]
        body = bytearray(client.get_object(Bucket=s3_bucket, Key=pack)["Body"].read())
        body[len(body) // 3] ^= 0x40  # inside the first half of the data: a chunk's record
        client.put_object(Bucket=s3_bucket, Key=pack, Body=bytes(body))
        source = img.read_bytes()
        size = len(source)
        with s3_mounted(url, tmp_path / "mnt", env, "--direct-io") as mnt:
            flat = mnt / "web" / rp / "disk0-flat.vmdk"
            blocks = read_blocks(flat, size, DEFAULT_CHUNK)
        failed = [off for off, got in blocks.items() if not isinstance(got, bytes)]
        assert len(failed) == 1, failed
        assert blocks[failed[0]] == errno.EIO
        for off, got in blocks.items():
            if isinstance(got, bytes):
                assert got == source[off : off + DEFAULT_CHUNK], off
        log = (tmp_path / "mnt.log").read_text()
        bad = failed[0]
        assert f"I/O error reading web/{rp}/disk0-flat.vmdk bytes {bad}-" in log, log
        assert log.count("I/O error reading") == 1, log

    def test_disk_cache_stays_bounded_and_serves_a_remount(
        self,
        tmp_path: Path,
        s3_server: S3Server,
        s3_bucket: str,
        s3_repo: tuple[str, dict[str, str], Path, str],
    ) -> None:
        """Reading more than --disk-cache-size keeps chunks/ under it; damaged cache files
        are fetched again; a cache holding everything serves a mount with the packs gone."""
        url, env, img, rp = s3_repo
        chunks = _cache_of(env) / "chunks"
        bound = 4 * MiB

        def usage() -> int:
            return sum(p.stat().st_size for p in chunks.rglob("*") if p.is_file())

        with s3_mounted(url, tmp_path / "m1", env, "--direct-io", "--disk-cache-size", "4M") as m:
            flat = m / "web" / rp / "disk0-flat.vmdk"
            fd = os.open(flat, os.O_RDONLY)
            try:
                for off in range(0, img.stat().st_size, MiB):
                    os.pread(fd, MiB, off)
                    assert usage() <= bound
            finally:
                os.close(fd)
        assert 0 < usage() <= bound
        shutil.rmtree(chunks)
        with s3_mounted(url, tmp_path / "m2", env, "--direct-io", "--disk-cache-size", "1G") as m:
            qemu_compare(img, m / "web" / rp / "disk0-flat.vmdk")
        assert usage() > img.stat().st_size // 2  # the random half of the disk, at least
        cached = sorted(  # not a record still being written by the exiting daemon
            p
            for p in chunks.rglob("*")
            if p.is_file() and p.name != ".lock" and not p.name.endswith(".tmp")
        )
        flipped, cut = cached[0], cached[1]
        damaged = bytearray(flipped.read_bytes())
        damaged[len(damaged) // 2] ^= 1
        flipped.write_bytes(bytes(damaged))
        cut.write_bytes(cut.read_bytes()[:-1])
        with s3_mounted(url, tmp_path / "m3", env, "--direct-io") as m:
            qemu_compare(img, m / "web" / rp / "disk0-flat.vmdk")  # damaged copies: misses
        assert flipped.read_bytes() != bytes(damaged)  # fetched again and replaced
        client = s3_server.client()
        for o in client.list_objects_v2(Bucket=s3_bucket, Prefix="repo/packs/")["Contents"]:
            client.delete_object(Bucket=s3_bucket, Key=o["Key"])
        with s3_mounted(url, tmp_path / "m4", env, "--direct-io") as m:
            qemu_compare(img, m / "web" / rp / "disk0-flat.vmdk")


class TestMountS3Outage:
    def test_sync_failure_is_logged_once_and_the_mount_serves_on(
        self, tmp_path: Path, own_s3_server: S3Server
    ) -> None:
        """With the endpoint down the mount keeps serving what it has, logs the outage once,
        and says so when syncs work again."""
        env = host_env(dict(os.environ), tmp_path / "host-a")
        env.update(own_s3_server.env())
        env["AWS_MAX_ATTEMPTS"] = "1"
        env["REPOFS_S3_CONNECT_TIMEOUT"] = "1"
        own_s3_server.create_bucket("outage")
        url = "s3://outage/repo"
        repofs("init", url, env=env)
        img = random_image(tmp_path / "src.img", 4 * MiB)
        rp = ingest(url, "web", f"disk0={img}", env=env)  # type: ignore[arg-type]
        log = tmp_path / "mnt.log"
        with s3_mounted(url, tmp_path / "mnt", env, "--refresh", "0.5", "--direct-io") as mnt:
            flat = mnt / "web" / rp / "disk0-flat.vmdk"
            qemu_compare(img, flat)  # every chunk now in the memory cache
            own_s3_server.kill()
            time.sleep(3)
            assert sorted(os.listdir(mnt / "web")) == sorted([rp, "latest"])
            qemu_compare(img, flat)
            assert log.read_text().count("cannot sync with") == 1, log.read_text()
            own_s3_server.start()
            deadline = time.monotonic() + 20
            while "works again" not in log.read_text():
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.2)


class TestMovedObjects:
    def test_read_of_an_object_moved_by_another_host_syncs_and_succeeds(
        self,
        tmp_path: Path,
        s3_server: S3Server,
        s3_bucket: str,
        s3_repo: tuple[str, dict[str, str], Path, str],
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """A chunk another host copied to a new pack (old one retired, deleted) reads right."""
        from repofs.store.opening import open_repository
        from repofs.store.packstore import new_pack_id
        from repofs.store.records import RECORD_HEADER_SIZE, RecordType
        from repofs.store.s3packs import pack_name
        from repofs.store.schema import object_key
        from repofs.store.segment import Segment

        url, env, img, rp_id = s3_repo
        source = img.read_bytes()
        moved_at = 2 * MiB  # in the random first half: a chunk of its own
        with s3_mounted(url, tmp_path / "mnt", env, "--direct-io", "--refresh", "0") as mnt:
            flat = mnt / "web" / rp_id / "disk0-flat.vmdk"
            fd = os.open(flat, os.O_RDONLY)
            try:
                assert os.pread(fd, DEFAULT_CHUNK, 0) == source[:DEFAULT_CHUNK]  # map loaded
                # Host B moves the chunk: copy to a new pack, introduce it, retire the old.
                for key, value in host_env(env, tmp_path / "host-b").items():
                    monkeypatch.setenv(key, value)
                with open_repository(url) as repo:
                    rp = repo.latest("web")
                    assert rp is not None
                    (digest,) = repo.map_reader(rp.disks[0]).refs(moved_at // DEFAULT_CHUNK, 1)
                    loc = repo.index.locate(RecordType.CHUNK, digest)
                    assert loc is not None
                    record = repo.packs.read(
                        loc.pack_id, loc.offset, RECORD_HEADER_SIZE + loc.stored_len
                    )
                    new_id = new_pack_id()
                    repo.bucket.put(pack_name(new_id), record)
                    entry = (RecordType.CHUNK, digest, 0, loc.stored_len, loc.raw_len)
                    key = object_key(RecordType.CHUNK, digest).hex()
                    repo.log.publish(
                        Segment(
                            "facts",
                            packs=[(new_id, len(record), [entry])],
                            retire=[{"pack": loc.pack_id.hex(), "keys": [key]}],
                        )
                    )
                    repo.bucket.delete(pack_name(loc.pack_id))
                got = os.pread(fd, DEFAULT_CHUNK, moved_at)
            finally:
                os.close(fd)
        assert got == source[moved_at : moved_at + DEFAULT_CHUNK]
        assert "I/O error" not in (tmp_path / "mnt.log").read_text()


class TestRefreshOption:
    def test_negative_refresh_is_one_line(self, tmp_path: Path, repo: Path) -> None:
        """--refresh below 0 is refused in one line before anything is mounted."""
        (tmp_path / "mnt").mkdir()
        proc = repofs("mount", repo, tmp_path / "mnt", "--refresh", "-1", check=False)
        assert proc.returncode == 2
        assert_one_line_error(proc, "--refresh")
        assert not is_mounted(tmp_path / "mnt")


class TestRequestsPerRead:
    def test_gets_per_read(
        self,
        tmp_path: Path,
        s3_repo: tuple[str, dict[str, str], Path, str],
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """Cold: one GET per random 4 KiB read, one per 1 MiB run, few for a whole sweep."""
        from repofs.mount.vfs import RepoView
        from repofs.read.diskread import DiskReader
        from repofs.store.opening import open_repository

        url, env, img, _rp = s3_repo
        source = img.read_bytes()
        for key, value in host_env(env, tmp_path / "host-r").items():
            monkeypatch.setenv(key, value)
        with open_repository(url) as repo:
            view = RepoView(repo)
            try:
                rp = repo.latest("web")
                assert rp is not None
                reader = DiskReader(repo, rp.disks[0], view.cache, view.prefetcher)
                gets = repo.bucket.counts  # type: ignore[attr-defined]

                def read(offset: int, size: int) -> int:
                    before = gets["GET"]
                    assert reader.read(offset, size) == source[offset : offset + size]
                    return gets["GET"] - before

                # Each read over 2 MiB from where the last ended (and from 0): none looks
                # sequential, so none starts a readahead.
                assert read(9 * MiB + 4096, 4096) == 2  # the map page, then the chunk
                assert read(4 * MiB + 8192, 4096) == 1
                assert read(MiB, 4096) == 1
                assert read(7 * MiB, MiB) == 1  # 8 neighbouring records: one coalesced GET
                before = gets["GET"]
                for off in range(0, len(source), MiB):
                    assert reader.read(off, MiB) == source[off : off + MiB]
                assert gets["GET"] - before <= 2 * len(source) // (4 * MiB) + 4
            finally:
                view.close()
