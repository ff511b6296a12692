"""A repository in a bucket under hostile conditions, with real processes and a real SeaweedFS.

Several hosts (separate caches) at once, kill -9 at chosen and random moments, the
S3 server dying, a proxy that fails requests, and bucket content an attacker replaced:
every case ends with each host seeing the same committed restore points, reading
identical bytes, and the next ingest working; failures are one line.
"""

from __future__ import annotations

import contextlib
import os
import random
from collections.abc import Iterator
from pathlib import Path

from repofs.store.location import set_s3_settings
from tests.support.faultproxy import FaultProxy
from tests.support.helpers import make_image, qemu_compare, repofs
from tests.support.s3hosts import (
    host_env,
    ingest_s3,
    listed,
    mounted_s3,
)
from tests.support.s3server import S3Server

MiB = 1 << 20
PAUSE_LINE = "pausing before commit"


def random_disk(path: Path, size: int, data_mib: int, seed: int) -> Path:
    """A sparse image with ``data_mib`` MiB of incompressible data spread over it."""
    rng = random.Random(seed)
    step = size // data_mib
    return make_image(path, size, [(i * step, rng.randbytes(MiB)) for i in range(data_mib)])


@contextlib.contextmanager
def opened(url: str, env: dict[str, str], cache: Path) -> Iterator[object]:
    """The repository opened in this process (to look at its cache's tables)."""
    from repofs.store.s3repo import S3Repository

    saved = dict(os.environ)
    os.environ.update({k: v for k, v in env.items() if k.startswith(("AWS_", "REPOFS_"))})
    set_s3_settings(cache_dir=str(cache))
    try:
        repo = S3Repository.open_bucket(url)
        try:
            yield repo
        finally:
            repo.close()
    finally:
        set_s3_settings(cache_dir=None)
        os.environ.clear()
        os.environ.update(saved)


def referenced_packs(url: str, env: dict[str, str], cache: Path) -> set[str]:
    """Pack object names the log introduces (what a fresh host's index holds)."""
    from repofs.store.s3packs import pack_name

    with opened(url, env, cache) as repo:
        idx = repo.index  # type: ignore[attr-defined]
        return idx.read(lambda txn: {pack_name(k) for k, _ in idx.items(txn, "packs")})


def prefix_objects(names: list[str], sub: str) -> set[str]:
    return {n.split("/", 1)[1] for n in names if n.split("/", 1)[1].startswith(sub)}


class TestTransientFaults:
    def test_ingest_list_and_mount_through_a_failing_proxy(
        self, tmp_path: Path, s3_server: S3Server, s3_env: dict[str, str], s3_url: str
    ) -> None:
        """503 SlowDown, 500, resets and cut bodies on a share of requests: retried, same bytes."""
        env0 = host_env(s3_env, tmp_path / "cache")
        repofs("init", s3_url, env=env0)
        disk = random_disk(tmp_path / "d.raw", 64 * MiB, 8, 4)
        faults = ("503", "500", "reset", "reset-after", "truncate")
        with FaultProxy(s3_server.endpoint, rate=0.25, faults=faults, seed=3) as proxy:
            env = host_env(s3_env, tmp_path / "cache", AWS_ENDPOINT_URL=proxy.endpoint)
            rp = ingest_s3(s3_url, "vm", env, f"disk0={disk}")
            reader = host_env(env, tmp_path / "reader")
            assert listed(s3_url, reader) == [("vm", rp)]
            with mounted_s3(s3_url, tmp_path / "mnt", reader, "--cache-size", "8M") as mnt:
                qemu_compare(mnt / "vm" / rp / "disk0-flat.vmdk", disk)
            injected = sum(proxy.counts[f] for f in faults)
        assert injected >= 5, proxy.counts
        assert listed(s3_url, host_env(s3_env, tmp_path / "direct")) == [("vm", rp)]

    def test_commit_whose_answer_was_lost_commits_once(
        self, tmp_path: Path, s3_server: S3Server, s3_env: dict[str, str], s3_url: str
    ) -> None:
        """The commit PUT arrives, its answer is lost: the retry's 412 is its own, not a rival."""
        env0 = host_env(s3_env, tmp_path / "cache")
        repofs("init", s3_url, env=env0)
        disk = random_disk(tmp_path / "d.raw", 16 * MiB, 2, 5)
        with FaultProxy(
            s3_server.endpoint,
            rate=1.0,
            faults=("reset-after",),
            limit=1,
            match=lambda method, path: method == "PUT" and "/log/c-" in path,
        ) as proxy:
            env = host_env(s3_env, tmp_path / "cache", AWS_ENDPOINT_URL=proxy.endpoint)
            rp = ingest_s3(s3_url, "vm", env, f"disk0={disk}")
            assert proxy.counts["reset-after"] == 1
        assert listed(s3_url, host_env(s3_env, tmp_path / "fresh")) == [("vm", rp)]

    def test_init_whose_answer_was_lost_succeeds(
        self, tmp_path: Path, s3_server: S3Server, s3_env: dict[str, str], s3_url: str
    ) -> None:
        """init's conditional config PUT answered by a reset: the retry sees its own config."""
        with FaultProxy(
            s3_server.endpoint,
            rate=1.0,
            faults=("reset-after",),
            limit=1,
            match=lambda method, path: (
                method == "PUT" and path.split("?")[0].endswith("/config.json")
            ),
        ) as proxy:
            env = host_env(s3_env, tmp_path / "cache", AWS_ENDPOINT_URL=proxy.endpoint)
            repofs("init", s3_url, env=env)
            assert proxy.counts["reset-after"] == 1
        assert listed(s3_url, host_env(s3_env, tmp_path / "fresh")) == []
