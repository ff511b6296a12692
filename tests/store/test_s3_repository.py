"""A repository in a bucket under hostile conditions, with real processes and a real SeaweedFS.

Several hosts (separate caches) at once, kill -9 at chosen and random moments, the
S3 server dying, a proxy that fails requests, and bucket content an attacker replaced:
every case ends with each host seeing the same committed restore points, reading
identical bytes, and the next ingest working; failures are one line.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from repofs.store.location import set_s3_settings
from tests.support.faultproxy import FaultProxy
from tests.support.helpers import assert_one_line_error, make_image, qemu_compare, repofs
from tests.support.s3hosts import (
    bucket_names,
    bucket_objects,
    host_env,
    ingest_s3,
    listed,
    mounted_s3,
    spawn_s3,
    wait_for_line,
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


_DAMAGES = ["garbage", "swapped", "foreign", "lease", "pack-garbage", "pack-swapped"]

class TestConcurrentHosts:
    def test_two_hosts_ingest_different_vms_at_once(
        self, tmp_path: Path, s3_env: dict[str, str], s3_url: str
    ) -> None:
        """Two hosts ingest two VMs into one bucket at once; every host then sees both."""
        hosts = [host_env(s3_env, tmp_path / f"cache{i}") for i in range(3)]
        repofs("init", s3_url, env=hosts[0])
        disks = [random_disk(tmp_path / f"d{i}.raw", 64 * MiB, 6, i) for i in range(2)]
        procs = [
            spawn_s3("ingest", s3_url, "--vm", f"vm{i}", f"disk0={disks[i]}", env=hosts[i])
            for i in range(2)
        ]
        ids = []
        for proc in procs:
            out, err = proc.communicate(timeout=300)
            assert proc.returncode == 0, err
            ids.append(out.strip().splitlines()[-1])
        want = [("vm0", ids[0]), ("vm1", ids[1])]
        for env in hosts:  # both writers' caches and a fresh third one
            assert sorted(listed(s3_url, env)) == want
        with mounted_s3(s3_url, tmp_path / "mnt", hosts[2]) as mnt:
            for i in range(2):
                qemu_compare(mnt / f"vm{i}" / ids[i] / "disk0-flat.vmdk", disks[i])

    def test_two_hosts_commit_the_same_vm_in_the_same_second(
        self, tmp_path: Path, s3_env: dict[str, str], s3_url: str
    ) -> None:
        """Both reserve one id; the conditional commit lets one win, the other takes the next."""
        hosts = [host_env(s3_env, tmp_path / f"cache{i}") for i in range(3)]
        repofs("init", s3_url, env=hosts[0])
        disks = [random_disk(tmp_path / f"d{i}.raw", 32 * MiB, 3, 10 + i) for i in range(2)]
        paused = [
            dict(h, REPOFS_TEST_PAUSE_BEFORE_COMMIT="2") for h in hosts[:2]
        ]  # both hold their id over the same moment
        procs = [
            spawn_s3("ingest", s3_url, "--vm", "same", f"disk0={disks[i]}", env=paused[i])
            for i in range(2)
        ]
        ids = []
        for proc in procs:
            out, err = proc.communicate(timeout=300)
            assert proc.returncode == 0, err
            ids.append(out.strip().splitlines()[-1])
        assert len(set(ids)) == 2
        want = sorted(("same", i) for i in ids)
        for env in hosts:
            assert sorted(listed(s3_url, env)) == want
        with mounted_s3(s3_url, tmp_path / "mnt", hosts[2]) as mnt:
            for i in range(2):
                qemu_compare(mnt / "same" / ids[i] / "disk0-flat.vmdk", disks[i])


class TestKilledIngest:
    @pytest.mark.parametrize("moment", ["uploading", "before-commit"])
    def test_kill_during_uploads_or_before_commit(
        self,
        tmp_path: Path,
        s3_server: S3Server,
        s3_bucket: str,
        s3_env: dict[str, str],
        s3_url: str,
        moment: str,
    ) -> None:
        """kill -9 mid-upload or once every pack is stored: nothing visible; leftovers only."""
        env = host_env(s3_env, tmp_path / "cache")
        repofs("init", s3_url, env=env)
        base = random_disk(tmp_path / "base.raw", 32 * MiB, 3, 1)
        kept = ingest_s3(s3_url, "vm", env, f"disk0={base}")
        before = bucket_names(s3_server, s3_bucket)
        disk = random_disk(tmp_path / "d.raw", 64 * MiB, 56, 2)
        if moment == "uploading":  # 56 MiB at 8 MiB/s: killed once the first pack is in
            proc = spawn_s3(
                "ingest", s3_url, "--vm", "vm", f"disk0={disk}", "--limit-upload", "8192", env=env
            )
            deadline = time.monotonic() + 60
            while not prefix_objects(bucket_names(s3_server, s3_bucket), "packs/") - set(
                prefix_objects(before, "packs/")
            ):
                assert time.monotonic() < deadline and proc.poll() is None
                time.sleep(0.1)
        else:
            proc = spawn_s3(
                "ingest",
                s3_url,
                "--vm",
                "vm",
                f"disk0={disk}",
                env=dict(env, REPOFS_TEST_PAUSE_BEFORE_COMMIT="60"),
            )
            wait_for_line(proc, PAUSE_LINE)
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
        assert proc.returncode == -signal.SIGKILL
        after = bucket_names(s3_server, s3_bucket)
        new_leases = prefix_objects(after, "leases/") - prefix_objects(before, "leases/")
        new_packs = prefix_objects(after, "packs/") - prefix_objects(before, "packs/")
        assert len(new_leases) == 1 and new_packs
        assert prefix_objects(after, "log/") == prefix_objects(before, "log/")
        fresh = tmp_path / "fresh"
        assert listed(s3_url, host_env(s3_env, fresh)) == [("vm", kept)]
        assert not new_packs & referenced_packs(s3_url, env, tmp_path / "inproc")
        # The killed host itself goes on: its next ingest commits, and reads back.
        again = ingest_s3(s3_url, "vm", env, f"disk0={disk}")
        assert listed(s3_url, host_env(s3_env, fresh)) == [("vm", kept), ("vm", again)]
        with mounted_s3(s3_url, tmp_path / "mnt", host_env(s3_env, tmp_path / "c3")) as mnt:
            qemu_compare(mnt / "vm" / again / "disk0-flat.vmdk", disk)
            qemu_compare(mnt / "vm" / kept / "disk0-flat.vmdk", base)

    @pytest.mark.slow
    def test_kill_at_random_moments(
        self, tmp_path: Path, s3_env: dict[str, str], s3_url: str
    ) -> None:
        """kill -9 at random delays (uploads, commit PUT, after): only whole restore points."""
        env = host_env(s3_env, tmp_path / "cache", REPOFS_LIMIT_UPLOAD="20000")
        repofs("init", s3_url, env=env)
        disk = random_disk(tmp_path / "d.raw", 64 * MiB, 10, 3)
        rng = random.Random(7)
        committed: list[str] = []
        probe = time.monotonic()
        committed.append(ingest_s3(s3_url, "vm", env, f"disk0={disk}"))
        took = time.monotonic() - probe
        for round_ in range(8):
            with open(disk, "r+b") as f:  # new data each round: uploads to kill
                f.seek(round_ * MiB)
                f.write(rng.randbytes(MiB))
            proc = spawn_s3("ingest", s3_url, "--vm", "vm", f"disk0={disk}", env=env)
            time.sleep(rng.uniform(0.2, took * 1.2))
            proc.send_signal(signal.SIGKILL)
            out, _err = proc.communicate()
            if proc.returncode == 0:
                committed.append(out.strip().splitlines()[-1])
            seen = listed(s3_url, host_env(s3_env, tmp_path / f"fresh{round_}"))
            ids = [i for _vm, i in seen]
            # A kill after the commit PUT but before "committed" printed is committed too.
            assert set(committed) <= set(ids) and len(ids) - len(committed) <= 1
            committed = ids
        last = ingest_s3(s3_url, "vm", env, f"disk0={disk}")
        with mounted_s3(s3_url, tmp_path / "mnt", host_env(s3_env, tmp_path / "reader")) as mnt:
            qemu_compare(mnt / "vm" / last / "disk0-flat.vmdk", disk)
            for rp in committed:  # every restore point that exists reads whole
                with open(mnt / "vm" / rp / "disk0-flat.vmdk", "rb") as f:
                    while f.read(8 * MiB):
                        pass


class TestServerDies:
    @pytest.mark.parametrize(
        "moment", ["uploading", pytest.param("before-commit", marks=pytest.mark.slow)]
    )
    def test_s3_server_killed_during_ingest(
        self, tmp_path: Path, own_s3_server: S3Server, moment: str
    ) -> None:
        """The server dies mid-ingest: one line in bounded time; after its restart, all is well."""
        server = own_s3_server
        bucket = server.create_bucket("repofs-dies")
        url = f"s3://{bucket}/repo"
        env = host_env(
            {**os.environ, **server.env()},
            tmp_path / "cache",
            AWS_MAX_ATTEMPTS="2",
            REPOFS_S3_CONNECT_TIMEOUT="1",
            REPOFS_S3_READ_TIMEOUT="5",
        )
        repofs("init", url, env=env)
        base = random_disk(tmp_path / "base.raw", 16 * MiB, 2, 1)
        kept = ingest_s3(url, "vm", env, f"disk0={base}")
        disk = random_disk(tmp_path / "d.raw", 64 * MiB, 12, 2)
        if moment == "uploading":
            proc = spawn_s3(
                "ingest", url, "--vm", "vm", f"disk0={disk}", "--limit-upload", "4096", env=env
            )
            time.sleep(2.0)
        else:
            proc = spawn_s3(
                "ingest",
                url,
                "--vm",
                "vm",
                f"disk0={disk}",
                env=dict(env, REPOFS_TEST_PAUSE_BEFORE_COMMIT="3"),
            )
            wait_for_line(proc, PAUSE_LINE)
        killed_at = time.monotonic()
        server.kill()
        _out, err = proc.communicate(timeout=120)
        took = time.monotonic() - killed_at
        assert proc.returncode != 0
        assert_one_line_error(subprocess.CompletedProcess([], proc.returncode, "", err))
        assert took < 60, f"the ingest took {took:.0f} s to give up"
        server.start()
        assert listed(url, host_env(env, tmp_path / "fresh")) == [("vm", kept)]
        again = ingest_s3(url, "vm", env, f"disk0={disk}")
        assert listed(url, host_env(env, tmp_path / "fresh2")) == [("vm", kept), ("vm", again)]
        with mounted_s3(url, tmp_path / "mnt", host_env(env, tmp_path / "reader")) as mnt:
            qemu_compare(mnt / "vm" / again / "disk0-flat.vmdk", disk)


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
        assert injected >= 3, proxy.counts
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

    @pytest.mark.parametrize("fault", ["reset-after", "reset"])
    def test_commit_put_failing_after_the_last_try(
        self,
        tmp_path: Path,
        s3_server: S3Server,
        s3_env: dict[str, str],
        s3_url: str,
        fault: str,
    ) -> None:
        """No retry left: a commit that landed succeeds; one that did not fails and stays gone."""
        env0 = host_env(s3_env, tmp_path / "cache")
        repofs("init", s3_url, env=env0)
        disk = random_disk(tmp_path / "d.raw", 16 * MiB, 2, 6)
        with FaultProxy(
            s3_server.endpoint,
            rate=1.0,
            faults=(fault,),
            limit=1,
            match=lambda method, path: method == "PUT" and "/log/c-" in path,
        ) as proxy:
            env = host_env(
                s3_env, tmp_path / "cache", AWS_ENDPOINT_URL=proxy.endpoint, AWS_MAX_ATTEMPTS="1"
            )
            proc = repofs("ingest", s3_url, "--vm", "vm", f"disk0={disk}", env=env, check=False)
            assert proxy.counts[fault] == 1
        fresh = host_env(s3_env, tmp_path / "fresh")
        if fault == "reset-after":  # it landed: committed, and said so
            assert proc.returncode == 0, proc.stderr
            assert listed(s3_url, fresh) == [("vm", proc.stdout.strip().splitlines()[-1])]
            return
        assert_one_line_error(proc, "cannot reach")
        assert listed(s3_url, fresh) == []
        again = ingest_s3(s3_url, "vm", env0, f"disk0={disk}")
        assert listed(s3_url, host_env(s3_env, tmp_path / "fresh2")) == [("vm", again)]

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


def _two_vms(
    tmp_path: Path, env: dict[str, str], url: str, *init: str
) -> tuple[Path, Path, str, str]:
    repofs("init", url, *init, env=env)
    a = random_disk(tmp_path / "a.raw", 16 * MiB, 2, 21)
    b = random_disk(tmp_path / "b.raw", 16 * MiB, 2, 22)
    return a, b, ingest_s3(url, "vma", env, f"disk0={a}"), ingest_s3(url, "vmb", env, f"disk0={b}")


def _commit_of(names: list[str], before: list[str]) -> str:
    (name,) = prefix_objects(names, "log/c-") - prefix_objects(before, "log/c-")
    return name


def same_bytes_or_eio(path: Path, disk: Path) -> None:
    """``path`` reads as ``disk`` does, or fails with an I/O error: never other bytes.

    (A plain repository cannot tell a foreign commit from its own: it lists a
    restore point whose packs are elsewhere, and reading it fails.)
    """
    with open(path, "rb") as got, open(disk, "rb") as want:
        while True:
            try:
                block = got.read(4 * MiB)
            except OSError as exc:
                assert exc.errno == errno.EIO, exc
                return
            assert block == want.read(4 * MiB)
            if not block:
                return


class TestHostileBucket:
    def _put(self, server: S3Server, bucket: str, name: str, body: bytes) -> None:
        server.client().put_object(Bucket=bucket, Key=f"repo/{name}", Body=body)

    def _still_sane(
        self, tmp_path: Path, env: dict[str, str], url: str, disks: dict[str, Path], tag: str
    ) -> None:
        """Every command works or says one line; what is listed reads back identical."""
        for host in (env, host_env(env, tmp_path / f"fresh-{tag}")):
            proc = repofs("list", url, "--json", env=host, check=False)
            if proc.returncode != 0:
                assert_one_line_error(proc)
                continue
            assert "Traceback" not in proc.stderr
            shown = [(d["vm"], d["id"]) for d in json.loads(proc.stdout)]
            assert {vm for vm, _ in shown} <= set(disks)
            with mounted_s3(url, tmp_path / f"mnt-{tag}", host) as mnt:
                for vm, rp in shown:
                    same_bytes_or_eio(mnt / vm / rp / "disk0-flat.vmdk", disks[vm])
        c = random_disk(tmp_path / f"c-{tag}.raw", 8 * MiB, 1, 99)
        proc = repofs("ingest", url, "--vm", f"vmc{tag}", f"disk0={c}", env=env, check=False)
        if proc.returncode != 0:
            assert_one_line_error(proc)

    @pytest.mark.parametrize(
        ("damage", "encrypted"),
        [  # a sample runs by default: garbage and a foreign commit, sealed and plain
            pytest.param(
                d,
                encrypted,
                id=f"{d}-{'encrypted' if encrypted else 'plain'}",
                marks=()
                if (d, encrypted) in (("garbage", True), ("foreign", True), ("foreign", False))
                else pytest.mark.slow,
            )
            for encrypted in (True, False)
            for d in _DAMAGES
        ],
    )
    def test_replaced_log_objects(
        self,
        tmp_path: Path,
        s3_server: S3Server,
        s3_bucket: str,
        s3_env: dict[str, str],
        s3_url: str,
        damage: str,
        encrypted: bool,
    ) -> None:
        """A commit replaced by garbage, another commit or a foreign one: never wrong bytes."""
        env = host_env(s3_env, tmp_path / "cache")
        init = () if encrypted else ("--encryption", "none")
        before = bucket_names(s3_server, s3_bucket)
        repofs("init", s3_url, *init, env=env)
        a = random_disk(tmp_path / "a.raw", 16 * MiB, 2, 21)
        rp_a = ingest_s3(s3_url, "vma", env, f"disk0={a}")
        mid = bucket_names(s3_server, s3_bucket)
        commit_a = _commit_of(mid, before)
        b = random_disk(tmp_path / "b.raw", 16 * MiB, 2, 22)
        ingest_s3(s3_url, "vmb", env, f"disk0={b}")
        commit_b = _commit_of(bucket_names(s3_server, s3_bucket), mid)
        objects = bucket_objects(s3_server, s3_bucket)
        if damage == "garbage":
            self._put(s3_server, s3_bucket, commit_a, os.urandom(700))
        elif damage == "swapped":
            self._put(s3_server, s3_bucket, commit_b, objects[f"repo/{commit_a}"])
        elif damage == "foreign":
            other = f"s3://{s3_bucket}/other"
            oenv = host_env(s3_env, tmp_path / "other-cache")
            repofs("init", other, *init, env=oenv)
            mark = bucket_names(s3_server, s3_bucket)
            foreign_disk = random_disk(tmp_path / "f.raw", 16 * MiB, 2, 23)
            ingest_s3(other, "vma", oenv, f"disk0={foreign_disk}")
            names = bucket_names(s3_server, s3_bucket)
            (foreign,) = {n for n in names if n.startswith("other/log/c-")} - set(mark)
            body = s3_server.client().get_object(Bucket=s3_bucket, Key=foreign)["Body"].read()
            self._put(s3_server, s3_bucket, commit_a, body)
        elif damage == "lease":
            self._put(s3_server, s3_bucket, "leases/" + "ab" * 16, os.urandom(300))
        else:
            packs_a = sorted(prefix_objects(mid, "packs/") - prefix_objects(before, "packs/"))
            packs_b = sorted(prefix_objects(list(objects), "packs/") - set(packs_a))
            for name in packs_a:
                body = (
                    os.urandom(len(objects[f"repo/{name}"]))
                    if damage == "pack-garbage"
                    else objects[f"repo/{packs_b[0]}"]
                )
                self._put(s3_server, s3_bucket, name, body)
        del rp_a
        self._still_sane(tmp_path, env, s3_url, {"vma": a, "vmb": b}, damage)

    def test_forged_facts_in_a_plain_repository(
        self,
        tmp_path: Path,
        s3_server: S3Server,
        s3_bucket: str,
        s3_env: dict[str, str],
        s3_url: str,
    ) -> None:
        """Well-formed log objects with nonsense facts (plain repository: anyone can write one)."""
        from repofs.store.crypto import PLAIN
        from repofs.store.segment import Segment

        env = host_env(s3_env, tmp_path / "cache")
        a, b, _ra, _rb = _two_vms(tmp_path, env, s3_url, "--encryption", "none")
        keys = PLAIN
        forged = [
            Segment("facts", bury=[{"vm": "vma"}]),
            Segment("facts", bury=[{"vm": "vma", "id": "x", "nonce": "zz"}]),
            Segment("facts", rps=["not a document"]),  # type: ignore[list-item]
            Segment("facts", rps=[{"vm": "vmx", "id": "2026-01-01T000000Z"}]),
            Segment("facts", rps=[{"vm": "../x", "id": "2026-01-01T000000Z", "disks": []}]),
            Segment("facts", rps=[{"vm": "vmy", "id": "../../etc", "disks": []}]),
            Segment("facts", protect=[{"vm": 3}]),
            Segment("facts", condemn=[{"pack": "nothex"}]),
            Segment("facts", retire=[{"pack": "00" * 16, "keys": ["zz"]}]),
        ]
        with opened(s3_url, env, tmp_path / "inproc") as repo:
            idx = repo.index  # type: ignore[attr-defined]
            real = idx.read(lambda txn: [doc for _key, doc in idx.rp_items(txn)])[0]
        for change in (
            {"created": "yesterday"},
            {"note": 5},
            {"chunk_size": "big"},
            {"disks": [{**real["disks"][0], "capacity": "huge"}]},
            {"disks": [{**real["disks"][0], "capacity": real["disks"][0]["capacity"] * 4}]},
            {"disks": [{**real["disks"][0], "map_root": "../../x"}]},
        ):
            doc = {**real, "vm": "vmz", "id": "2026-01-01T000000Z", **change}
            forged.append(Segment("facts", rps=[doc]))
        for n, seg in enumerate(forged):
            name = f"log/f-{n:016x}-{'0' * 32}"
            self._put(s3_server, s3_bucket, name, seg.encode(keys, name))
        self._still_sane(tmp_path, env, s3_url, {"vma": a, "vmb": b}, "forged")

    @pytest.mark.slow
    def test_damaged_checkpoint(
        self,
        tmp_path: Path,
        s3_server: S3Server,
        s3_bucket: str,
        s3_env: dict[str, str],
        s3_url: str,
    ) -> None:
        """A checkpoint replaced by garbage: hosts fall back on the log objects themselves."""
        env = host_env(s3_env, tmp_path / "cache")
        a, b, ra, rb = _two_vms(tmp_path, env, s3_url)
        with opened(s3_url, env, tmp_path / "inproc") as repo:
            name = repo.log.write_checkpoint()  # type: ignore[attr-defined]
        self._put(s3_server, s3_bucket, name, b"RPFSLOG1" + os.urandom(500))
        proc = repofs("list", s3_url, "--json", env=host_env(env, tmp_path / "fresh"))
        shown = sorted((d["vm"], d["id"]) for d in json.loads(proc.stdout))
        assert shown == [("vma", ra), ("vmb", rb)]
        self._still_sane(tmp_path, env, s3_url, {"vma": a, "vmb": b}, "checkpoint")

    def test_damaged_newest_checkpoint_falls_back_on_the_one_before(
        self,
        tmp_path: Path,
        s3_server: S3Server,
        s3_bucket: str,
        s3_env: dict[str, str],
        s3_url: str,
    ) -> None:
        """gc compacted the log into checkpoint 1, checkpoint 2 is garbage: 1 still counts."""
        env = host_env(s3_env, tmp_path / "cache")
        a, b, ra, rb = _two_vms(tmp_path, env, s3_url)
        with opened(s3_url, env, tmp_path / "inproc") as repo:
            first = repo.log.write_checkpoint()  # type: ignore[attr-defined]
        compacted = prefix_objects(bucket_names(s3_server, s3_bucket), "log/")
        c = random_disk(tmp_path / "c.raw", 8 * MiB, 1, 23)
        rc = ingest_s3(s3_url, "vmc", env, f"disk0={c}")
        with opened(s3_url, env, tmp_path / "inproc") as repo:
            second = repo.log.write_checkpoint()  # type: ignore[attr-defined]
        assert first < second
        client = s3_server.client()
        for name in compacted:  # what gc does once checkpoint 1 is old enough
            client.delete_object(Bucket=s3_bucket, Key=f"repo/{name}")
        self._put(s3_server, s3_bucket, second, b"RPFSLOG1" + os.urandom(500))
        fresh = host_env(env, tmp_path / "fresh")
        want = [("vma", ra), ("vmb", rb), ("vmc", rc)]
        assert sorted(listed(s3_url, fresh)) == want
        self._still_sane(tmp_path, env, s3_url, {"vma": a, "vmb": b, "vmc": c}, "fallback")

    def test_encrypted_bucket_reveals_no_names(
        self,
        tmp_path: Path,
        s3_server: S3Server,
        s3_bucket: str,
        s3_env: dict[str, str],
        s3_url: str,
    ) -> None:
        """No object name or body in the bucket holds a VM name, disk name or restore point id."""
        env = host_env(s3_env, tmp_path / "cache")
        repofs("init", s3_url, env=env)
        disk = random_disk(tmp_path / "d.raw", 16 * MiB, 2, 31)
        rp = ingest_s3(s3_url, "secretvmalpha", env, f"privatediskbeta={disk}")
        repofs("protect", s3_url, "secretvmalpha", rp, env=env)
        with opened(s3_url, env, tmp_path / "inproc") as repo:
            repo.log.write_checkpoint()  # type: ignore[attr-defined]
        repofs("delete", s3_url, "secretvmalpha", rp, env=env, check=False)
        needles = [b"secretvmalpha", b"privatediskbeta", rp.encode(), rp[:10].encode()]
        needles.append(rp.replace("T", " ").encode())
        for name, body in bucket_objects(s3_server, s3_bucket).items():
            for needle in needles:
                assert needle not in name.encode(), name
                assert needle not in body, (name, needle)


class TestIncrementalUploads:
    def test_cbt_incremental_uploads_only_the_change(
        self, tmp_path: Path, s3_server: S3Server, s3_env: dict[str, str], s3_url: str
    ) -> None:
        """1 GiB disk, 4 MiB changed: a handful of PUTs and under 10 MiB uploaded."""
        env = host_env(s3_env, tmp_path / "cache")
        repofs("init", s3_url, env=env)
        disk = random_disk(tmp_path / "d.raw", 1 << 30, 48, 41)
        ingest_s3(s3_url, "vm", env, f"disk0={disk}")
        rng = random.Random(42)
        extents = []
        with open(disk, "r+b") as f:
            for i in range(4):
                offset = (100 + i * 200) * MiB
                f.seek(offset)
                f.write(rng.randbytes(MiB))
                extents.append([offset, MiB])
        cbt = tmp_path / "cbt.json"
        cbt.write_text(json.dumps({"block_size": 65536, "extents": extents}))
        time.sleep(1.1)
        with FaultProxy(s3_server.endpoint, rate=0.0) as proxy:
            proxied = host_env(s3_env, tmp_path / "cache", AWS_ENDPOINT_URL=proxy.endpoint)
            rp = ingest_s3(
                s3_url, "vm", proxied, f"disk0={disk}", extra=("--changed-blocks", f"disk0={cbt}")
            )
            puts, uploaded = proxy.counts["PUT"], proxy.uploaded
        assert puts <= 8, proxy.counts
        assert 4 * MiB <= uploaded < 10 * MiB, uploaded
        with mounted_s3(s3_url, tmp_path / "mnt", host_env(s3_env, tmp_path / "reader")) as mnt:
            qemu_compare(mnt / "vm" / rp / "disk0-flat.vmdk", disk)
