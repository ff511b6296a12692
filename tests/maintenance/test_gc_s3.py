"""gc, prune and protect on a repository in a bucket, with other hosts (caches) beside them."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.support.helpers import (
    cli_env,
    is_mounted,
    make_image,
    qemu_compare,
    repofs,
    spawn,
    unmount,
)
from tests.support.maint import MiB, kill9, noise, wait_for_line
from tests.support.s3server import S3Server

TTL, SKEW = 3.0, 1.0
#: How long after a condemnation (or a killed writer) gc may delete: ttl + skew, and a margin.
WAIT = TTL + SKEW + 1.5
TIMES = {
    "REPOFS_S3_LEASE_TTL": str(TTL),
    "REPOFS_S3_CLOCK_SKEW": str(SKEW),
    "REPOFS_S3_LOG_GRACE": "1",
}

_DIGEST = """
import hashlib, sys
from repofs.read.diskread import ChunkCache, DiskReader
from repofs.store.opening import open_repository
with open_repository(sys.argv[1]) as repo:
    rp = repo.resolve(sys.argv[2], sys.argv[3])
    info = rp.disk(sys.argv[4])
    data = DiskReader(repo, info, ChunkCache(repo, 8 << 20)).read(0, info.capacity)
    print(hashlib.sha256(data).hexdigest())
"""


class Hosts:
    """One repository in a fresh bucket, and the environment of each simulated host."""

    def __init__(
        self,
        server: S3Server,
        bucket: str,
        env: dict[str, str],
        tmp: Path,
        prefix: str = "repo",
        *init: str,
    ) -> None:
        self.server, self.bucket, self.base, self.tmp = server, bucket, env, tmp
        self.prefix = prefix
        self.url = f"s3://{bucket}/{prefix}"
        repofs("init", self.url, "--chunk-size", "64K", *init, env=self.env("a"))

    def env(self, host: str, **extra: str) -> dict[str, str]:
        return {**self.base, **TIMES, "REPOFS_CACHE_DIR": str(self.tmp / f"cache-{host}"), **extra}

    def run(self, host: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return repofs(*args, check=check, env=self.env(host))

    def ingest(self, host: str, vm: str, img: Path) -> str:
        out = self.run(host, "ingest", self.url, "--vm", vm, f"d0={img}").stdout
        return out.strip().splitlines()[-1]

    def gc(self, host: str, *extra: str) -> dict[str, Any]:
        return json.loads(self.run(host, "gc", self.url, "--json", *extra).stdout)

    def ids(self, host: str, vm: str) -> list[str]:
        doc = json.loads(self.run(host, "list", self.url, vm, "--json").stdout)
        return [rp["id"] for rp in doc]

    def digest(self, host: str, vm: str, rp_id: str) -> str:
        proc = subprocess.run(
            [sys.executable, "-c", _DIGEST, self.url, vm, rp_id, "d0"],
            capture_output=True,
            text=True,
            env=cli_env(self.env(host)),
            check=False,
        )
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.strip()

    def objects(self, sub: str) -> dict[str, int]:
        """Key -> size of every object under ``repo/<sub>``."""
        client = self.server.client()
        out: dict[str, int] = {}
        pages = client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=f"{self.prefix}/{sub}"
        )
        for page in pages:
            for obj in page.get("Contents", []):
                out[obj["Key"]] = obj["Size"]
        return out

    def pack_bytes(self) -> int:
        return sum(self.objects("packs/").values())


@pytest.fixture
def hosts(s3_server: S3Server, s3_bucket: str, s3_env: dict[str, str], tmp_path: Path) -> Hosts:
    return Hosts(s3_server, s3_bucket, s3_env, tmp_path)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def image(tmp: Path, name: str, *seeds: int) -> tuple[Path, str]:
    """An image of 1 MiB noise per seed; and the sha256 of its bytes."""
    path = make_image(
        tmp / name, len(seeds) * MiB, [(i * MiB, noise(MiB, s)) for i, s in enumerate(seeds)]
    )
    return path, sha(path.read_bytes())


class TestCondemnThenDelete:
    def test_frees_what_prune_released_after_the_wait(self, hosts: Hosts, tmp_path: Path) -> None:
        """gc condemns at once and deletes only once the wait is over; what stays reads back."""
        old, _ = image(tmp_path, "old.img", 1, 2, 3, 4)
        new, new_sha = image(tmp_path, "new.img", 5, 6)
        hosts.ingest("a", "vm", old)
        keep = hosts.ingest("a", "vm", new)
        hosts.run("a", "prune", hosts.url, "--keep-last", "1")
        before = hosts.pack_bytes()
        first = hosts.gc("b")
        assert first["packs_condemned"] >= 1 and first["packs_deleted"] == 0, first
        assert first["packs_held"] >= 1
        assert hosts.pack_bytes() == before
        time.sleep(WAIT)
        second = hosts.gc("b")
        assert second["packs_deleted"] >= 1, second
        assert before - hosts.pack_bytes() >= 4 * MiB
        assert hosts.digest("a", "vm", keep) == new_sha  # host a learns of the gc at its sync
        assert hosts.digest("c", "vm", keep) == new_sha  # a fresh host too

    def test_dry_run_changes_nothing(self, hosts: Hosts, tmp_path: Path) -> None:
        """--dry-run reports what gc would condemn and writes no object."""
        img, _ = image(tmp_path, "a.img", 1, 2)
        hosts.ingest("a", "vm", img)
        hosts.run("a", "prune", hosts.url, "--keep-last", "0", "--force")
        before = {k: v for k, v in hosts.objects("").items()}
        report = hosts.gc("b", "--dry-run")
        assert report["dry_run"] and report["packs_condemned"] >= 1
        assert hosts.objects("") == before


class TestBesideIngest:
    def test_ingest_that_deduplicated_against_a_condemned_object(
        self, hosts: Hosts, tmp_path: Path
    ) -> None:
        """An ingest running when gc condemned its data commits later: gc keeps what it uses."""
        first, _ = image(tmp_path, "first.img", 1, 2, 3)
        second, second_sha = image(tmp_path, "second.img", 1, 2, 3, 4)
        hosts.ingest("a", "vm", first)
        # gc leaves alone packs uploaded less than SKEW before a running ingest's lease
        # started (that ingest may have introduced them): let the first ingest's age.
        time.sleep(SKEW + 0.5)
        proc = spawn(
            "ingest",
            hosts.url,
            "--vm",
            "vm",
            f"d0={second}",
            env=hosts.env("b", REPOFS_TEST_PAUSE_BEFORE_COMMIT="35"),
        )
        try:
            wait_for_line(proc, "pausing before commit")
            hosts.run("a", "prune", hosts.url, "--keep-last", "0", "--force")
            condemned = hosts.gc("c")
            assert condemned["packs_condemned"] >= 1, condemned
            time.sleep(WAIT)
            held = hosts.gc("c")
            assert held["packs_deleted"] == 0 and held["packs_held"] >= 1, held
            assert held["orphan_packs"] == 0, held  # the paused ingest's packs stay too
            out, err = proc.communicate(timeout=120)
            assert proc.returncode == 0, err
        finally:
            if proc.poll() is None:
                kill9(proc)
        rp_id = out.strip().splitlines()[-1]
        freed = hosts.gc("c")
        assert freed["objects_rescued"] >= 1, freed  # the first three MiB lay in a condemned pack
        assert freed["packs_deleted"] >= 1, freed
        assert hosts.digest("b", "vm", rp_id) == second_sha
        assert hosts.digest("d", "vm", rp_id) == second_sha
        hosts.run("d", "verify", hosts.url)  # every object of every restore point re-hashed

    def test_killed_ingest_leftovers_go_after_the_grace(self, hosts: Hosts, tmp_path: Path) -> None:
        """A killed ingest's uploaded packs stay while its lease may live, then gc deletes them."""
        img, _ = image(tmp_path, "a.img", 7, 8)
        proc = spawn(
            "ingest",
            hosts.url,
            "--vm",
            "vm",
            f"d0={img}",
            env=hosts.env("a", REPOFS_TEST_PAUSE_BEFORE_COMMIT="60"),
        )
        wait_for_line(proc, "pausing before commit")
        kill9(proc)
        packs = hosts.objects("packs/")
        assert packs and hosts.objects("leases/")
        early = hosts.gc("b")
        assert early["orphan_packs"] == 0, early
        assert hosts.objects("packs/") == packs
        time.sleep(WAIT)
        late = hosts.gc("b")
        assert late["orphan_packs"] == len(packs), late
        assert late["leases_removed"] >= 1, late
        assert hosts.objects("packs/") == {} and hosts.objects("leases/") == {}

    @pytest.mark.slow
    def test_packs_a_running_ingest_introduced_are_not_condemned(
        self, s3_server: S3Server, s3_bucket: str, s3_env: dict[str, str], tmp_path: Path
    ) -> None:
        """A long ingest introduces its packs before its commit; gc leaves them to it."""
        hosts = Hosts(s3_server, s3_bucket, s3_env, tmp_path, "small", "--pack-size", "1M")
        img, want = image(tmp_path, "big.img", *range(100, 136))  # 36 packs: 32 introduced early
        proc = spawn(
            "ingest",
            hosts.url,
            "--vm",
            "vm",
            f"d0={img}",
            env=hosts.env("a", REPOFS_TEST_PAUSE_BEFORE_COMMIT="30"),
        )
        try:
            wait_for_line(proc, "pausing before commit", timeout=120)
            assert len(hosts.objects("log/")) == 1  # the facts object introducing 32 packs
            first = hosts.gc("b")
            assert first["packs_before"] >= 32 and first["packs_condemned"] == 0, first
            time.sleep(WAIT)
            second = hosts.gc("b")
            assert second["packs_condemned"] == 0 and second["orphan_packs"] == 0, second
            out, err = proc.communicate(timeout=120)
            assert proc.returncode == 0, err
        finally:
            if proc.poll() is None:
                kill9(proc)
        rp_id = out.strip().splitlines()[-1]
        assert hosts.gc("b")["packs_condemned"] == 0
        assert hosts.digest("c", "vm", rp_id) == want


class TestBesideMount:
    @pytest.mark.slow
    def test_a_stale_mount_reads_what_gc_moved(self, hosts: Hosts, tmp_path: Path) -> None:
        """A mount on another host that never refreshed reads chunks gc moved and deleted."""
        old, _ = image(tmp_path, "old.img", 1, 2, 3, 4)
        keep_img, _ = image(tmp_path, "keep.img", 1, 5)  # shares a MiB with old: a sparse pack
        first = hosts.ingest("a", "vm", old)
        keep = hosts.ingest("a", "vm", keep_img)
        mnt = tmp_path / "mnt"
        mnt.mkdir()
        log = tmp_path / "mnt.log"
        repofs("mount", hosts.url, mnt, "--log", log, "--refresh", "0", env=hosts.env("m"))
        try:
            assert is_mounted(mnt)
            hosts.run("a", "delete", hosts.url, "vm", first)
            moved = hosts.gc("b")
            assert moved["packs_rewritten"] >= 1, moved
            time.sleep(WAIT)
            gone = hosts.gc("b")
            assert gone["packs_deleted"] >= 1, gone
            qemu_compare(keep_img, mnt / "vm" / keep / "d0-flat.vmdk")
        finally:
            unmount(mnt)
        assert "Traceback" not in log.read_text()


class TestAcrossHosts:
    def test_prune_and_delete_on_one_host_seen_by_another(
        self, hosts: Hosts, tmp_path: Path
    ) -> None:
        """A removal on host a is gone from host b's list at b's next command."""
        img, _ = image(tmp_path, "a.img", 1)
        ids = [hosts.ingest("a", "vm", img) for _ in range(3)]
        assert hosts.ids("b", "vm") == ids
        report = json.loads(hosts.run("a", "prune", hosts.url, "--keep-last", "2", "--json").stdout)
        assert report["removed_count"] == 1
        assert hosts.ids("b", "vm") == ids[1:]
        hosts.run("a", "delete", hosts.url, "vm", ids[1])
        assert hosts.ids("b", "vm") == ids[2:]

    def test_protect_on_one_host_holds_on_another(self, hosts: Hosts, tmp_path: Path) -> None:
        """Protected on host a: host b's prune keeps it and b's delete refuses it."""
        img, _ = image(tmp_path, "a.img", 1)
        ids = [hosts.ingest("a", "vm", img) for _ in range(2)]
        hosts.run("a", "protect", hosts.url, "vm", ids[0])
        hosts.run("b", "prune", hosts.url, "--keep-last", "0", "--force")
        assert hosts.ids("b", "vm") == ids[:1]
        refused = hosts.run("b", "delete", hosts.url, "vm", ids[0], check=False)
        assert refused.returncode != 0 and "protected" in refused.stderr
        hosts.run("b", "unprotect", hosts.url, "vm", ids[0])
        hosts.run("a", "delete", hosts.url, "vm", ids[0])
        gone = hosts.run("b", "list", hosts.url, "vm", check=False)
        assert gone.returncode != 0 and "no restore points" in gone.stderr

    @pytest.mark.slow
    def test_two_gcs_at_once_from_two_caches(self, hosts: Hosts, tmp_path: Path) -> None:
        """Two gcs on two hosts at the same time lose nothing and free the space between them."""
        imgs = [image(tmp_path, f"{i}.img", 10 * i + 1, 10 * i + 2) for i in range(3)]
        ids = [hosts.ingest("a", "vm", img) for img, _ in imgs]
        hosts.run("a", "delete", hosts.url, "vm", ids[0])
        before = hosts.pack_bytes()
        for _round in range(2):
            procs = [spawn("gc", hosts.url, "--json", env=hosts.env(h)) for h in ("b", "c")]
            for proc in procs:
                _out, err = proc.communicate(timeout=120)
                assert proc.returncode == 0, err
            time.sleep(WAIT)
        hosts.gc("b")
        assert before - hosts.pack_bytes() >= 2 * MiB
        for rp_id, (_img, want) in zip(ids[1:], imgs[1:], strict=True):
            assert hosts.digest("d", "vm", rp_id) == want
        hosts.run("d", "verify", hosts.url)


class TestLog:
    def test_compaction_keeps_every_fact_for_a_fresh_host(
        self, hosts: Hosts, tmp_path: Path
    ) -> None:
        """gc folds the log into a checkpoint; a host that never synced still sees it all."""
        img, want = image(tmp_path, "a.img", 1)
        ids = [hosts.ingest("a", "vm", img) for _ in range(4)]
        hosts.run("a", "protect", hosts.url, "vm", ids[3])
        hosts.run("a", "delete", hosts.url, "vm", ids[0])
        logs = len(hosts.objects("log/"))
        time.sleep(1.5)  # the log's grace period in these tests
        report = hosts.gc("b")
        assert report["logs_removed"] >= logs - 1, report
        assert len(hosts.objects("log/")) < logs
        assert hosts.ids("fresh", "vm") == ids[1:]
        doc = json.loads(hosts.run("fresh", "list", hosts.url, "vm", "--json").stdout)
        assert [rp["protected"] for rp in doc] == [False, False, True]
        assert hosts.digest("fresh", "vm", ids[3]) == want


class TestLease:
    def test_a_writer_whose_lease_lapsed_never_commits(
        self, own_s3_server: S3Server, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Renewals that fail for a ttl leave the lease refusing to commit once they work again."""
        from repofs.errors import RepositoryError
        from repofs.store.bucket import Bucket
        from repofs.store.crypto import Keys
        from repofs.store.leases import Lease
        from repofs.store.location import parse_s3

        for name, value in own_s3_server.env().items():
            monkeypatch.setenv(name, value)
        monkeypatch.setenv("REPOFS_S3_LEASE_TTL", "1.5")
        bucket = Bucket(parse_s3(f"s3://{own_s3_server.create_bucket('lapse')}/repo"))
        lease = Lease(bucket, Keys(), "ingest").start()
        try:
            time.sleep(1)
            lease.check()  # renewed on time
            own_s3_server.kill()
            time.sleep(2)
            own_s3_server.start()
            deadline = time.monotonic() + 60
            while not lease.lapsed and time.monotonic() < deadline:
                time.sleep(0.2)
            time.sleep(1)  # renewed again meanwhile: only the lapse refuses now
            with pytest.raises(RepositoryError, match="renewals failed"):
                lease.check()
        finally:
            lease.end()
