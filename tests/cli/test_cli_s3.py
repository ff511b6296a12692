"""Every command on an s3:// repository, against a real SeaweedFS: works, or one clear line.

Each error case also checks that nothing was written: no object in the bucket
and no cache directory on the host.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.support.helpers import (
    assert_one_line_error,
    cli_argv,
    cli_env,
    make_image,
    qemu_compare,
    repofs,
)
from tests.support.s3hosts import (
    bucket_names,
    host_env,
    ingest_s3,
    listed,
    mounted_s3,
    spawn_s3,
)
from tests.support.s3server import S3Server

MiB = 1 << 20


def _disk(tmp_path: Path, name: str = "disk.raw", size: int = 32 * MiB) -> Path:
    return make_image(
        tmp_path / name,
        size,
        [(i * MiB, bytes([i + 1]) * 200_000) for i in range(0, size // MiB, 3)],
    )


class TestS3WholeCli:
    def test_every_command_on_a_bucket(
        self, tmp_path: Path, s3_env: dict[str, str], s3_url: str
    ) -> None:
        """init, ingest (raw, qcow2, CBT), list, stats, protect, prune, delete, mount all work."""
        env = host_env(s3_env, tmp_path / "cache")
        repofs("init", s3_url, env=env)
        raw = _disk(tmp_path)
        first = ingest_s3(s3_url, "vm1", env, f"disk0={raw}")
        qcow = tmp_path / "disk.qcow2"
        subprocess.run(["qemu-img", "convert", "-O", "qcow2", raw, qcow], check=True)
        ingest_s3(s3_url, "vm2", env, f"disk0={qcow}")
        original = tmp_path / "original.raw"
        shutil.copyfile(raw, original)
        # A CBT incremental: 1 MiB changed, named by a repofs changed-block list.
        with open(raw, "r+b") as f:
            f.seek(5 * MiB)
            f.write(b"\xee" * MiB)
        cbt = tmp_path / "changed.json"
        cbt.write_text(json.dumps({"block_size": 65536, "extents": [[5 * MiB, MiB]]}))
        time.sleep(1.1)  # a second later: its own id
        third = ingest_s3(
            s3_url, "vm1", env, f"disk0={raw}", extra=("--changed-blocks", f"disk0={cbt}")
        )
        second = listed(s3_url, env, "vm2")[0][1]
        assert sorted(listed(s3_url, env)) == [("vm1", first), ("vm1", third), ("vm2", second)]
        table = repofs("list", s3_url, env=env).stdout
        assert " cbt " in table and "vm2" in table
        stats = repofs("stats", s3_url, env=env).stdout
        assert "restore points       3" in stats

        repofs("protect", s3_url, "vm1", first, env=env)
        docs = json.loads(repofs("list", s3_url, "--json", env=env).stdout)
        assert [d["protected"] for d in docs if (d["vm"], d["id"]) == ("vm1", first)] == [True]
        proc = repofs("delete", s3_url, "vm1", first, env=env, check=False)
        assert_one_line_error(proc, "protected")
        repofs("unprotect", s3_url, "vm1", first, env=env)

        with mounted_s3(s3_url, tmp_path / "mnt", env) as mnt:
            qemu_compare(mnt / "vm1" / third / "disk0-flat.vmdk", raw)
            qemu_compare(mnt / "vm2" / "latest" / "disk0-flat.vmdk", original)
            qemu_compare(mnt / "vm1" / first / "disk0-flat.vmdk", original)

        out = repofs("prune", s3_url, "--vm", "vm1", "--keep-last", "1", env=env).stdout
        assert "removed 1 restore point(s)" in out
        out = repofs("delete", s3_url, "vm2", second, env=env).stdout
        assert "deleted 1 restore point(s)" in out
        # Another host (a fresh cache) sees the same: the facts are in the bucket.
        other = host_env(s3_env, tmp_path / "other-cache")
        assert listed(s3_url, other) == [("vm1", third)]
        with mounted_s3(s3_url, tmp_path / "mnt2", other) as mnt:
            qemu_compare(mnt / "vm1" / "latest" / "disk0-flat.vmdk", raw)

    @pytest.mark.parametrize(
        "args", [["verify"], ["gc"], ["rebuild-index"], ["info"]], ids=lambda a: a[0]
    )
    def test_maintenance_commands_work_or_say_one_line(
        self, tmp_path: Path, s3_env: dict[str, str], s3_url: str, args: list[str]
    ) -> None:
        """verify, gc, rebuild-index and info succeed, or refuse with one line (no traceback)."""
        env = host_env(s3_env, tmp_path / "cache")
        repofs("init", s3_url, env=env)
        rp = ingest_s3(s3_url, "vm", env, f"disk0={_disk(tmp_path)}")
        proc = repofs(args[0], s3_url, *args[1:], env=env, check=False, timeout=300)
        if proc.returncode != 0:
            assert_one_line_error(proc)
        assert "Traceback" not in proc.stderr
        assert listed(s3_url, host_env(s3_env, tmp_path / "fresh")) == [("vm", rp)]

    def test_init_creates_the_bucket_only_when_asked(
        self, tmp_path: Path, s3_server: S3Server, s3_env: dict[str, str]
    ) -> None:
        """Without --create-bucket a missing bucket is one line; with it, init makes it."""
        env = host_env(s3_env, tmp_path / "cache")
        name = f"repofs-new-{time.time_ns() % 10**12}"
        proc = repofs("init", f"s3://{name}/r", env=env, check=False)
        assert_one_line_error(proc, "no such bucket", "--create-bucket")
        assert proc.returncode == 3
        assert name not in [b["Name"] for b in s3_server.client().list_buckets()["Buckets"]]
        repofs("init", f"s3://{name}/r", "--create-bucket", env=env)
        try:
            assert listed(f"s3://{name}/r", env) == []
        finally:
            for key in bucket_names(s3_server, name):
                s3_server.client().delete_object(Bucket=name, Key=key)
            s3_server.delete_bucket(name)


class TestS3InitRace:
    def test_inits_at_once_leave_one_repository_that_opens(
        self, tmp_path: Path, s3_env: dict[str, str], s3_bucket: str
    ) -> None:
        """Four inits of one prefix at once: one wins, the others say one line, and it opens."""
        for round_ in range(3):
            url = f"s3://{s3_bucket}/r{round_}"
            env = host_env(s3_env, tmp_path / f"cache{round_}")
            procs = [spawn_s3("init", url, env=env) for _ in range(4)]
            results = [(p.communicate(timeout=120), p.returncode) for p in procs]
            assert sum(1 for _out, rc in results if rc == 0) == 1, results
            for (out, err), rc in results:
                if rc != 0:
                    assert_one_line_error(subprocess.CompletedProcess([], rc, out, err))
            assert listed(url, host_env(s3_env, tmp_path / f"fresh{round_}")) == []


class TestS3Errors:
    @pytest.mark.parametrize(
        ("env_change", "needle"),
        [
            ({"AWS_SECRET_ACCESS_KEY": "wrong-secret"}, "credentials"),
            ({"AWS_ACCESS_KEY_ID": "nobody"}, "credentials"),
            ({"AWS_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_MAX_ATTEMPTS": "2"}, "cannot reach"),
        ],
        ids=["wrong-secret", "unknown-key-id", "closed-port"],
    )
    @pytest.mark.parametrize("command", ["init", "list", "ingest"])
    def test_bad_credentials_and_endpoints(
        self,
        tmp_path: Path,
        s3_server: S3Server,
        s3_env: dict[str, str],
        s3_bucket: str,
        env_change: dict[str, str],
        needle: str,
        command: str,
    ) -> None:
        """Refused credentials and a closed port: one line, exit 3, quickly, nothing written."""
        url = f"s3://{s3_bucket}/repo"
        good = host_env(s3_env, tmp_path / "good-cache")
        if command != "init":
            repofs("init", url, env=good)
        before = bucket_names(s3_server, s3_bucket)
        bad = host_env(s3_env, tmp_path / "cache", **env_change)
        args = {"init": ["init", url], "list": ["list", url]}.get(
            command, ["ingest", url, "--vm", "vm", f"d={_disk(tmp_path)}"]
        )
        began = time.monotonic()
        proc = repofs(*args, env=bad, check=False)
        assert time.monotonic() - began < 20
        assert_one_line_error(proc, needle)
        assert proc.returncode == 3
        assert bucket_names(s3_server, s3_bucket) == before
        assert not (tmp_path / "cache").exists()

    @pytest.mark.parametrize(
        ("url", "needle"),
        [
            ("s3://Bad_Bucket/r", "not a valid bucket name"),
            ("s3://ab/r", "not a valid bucket name"),
            ("s3:///r", "no bucket"),
            ("s3://bucket-name/a/../b", "'..'"),
            ("s3://bucket-name/a//b", "empty"),
            ("S3://bucket-name/r", "not an s3://BUCKET/PREFIX URL"),
            ("s3:/bucket-name/r", "not an s3://BUCKET/PREFIX URL"),
            ("https://bucket-name/r", "not an s3://BUCKET/PREFIX URL"),
        ],
    )
    @pytest.mark.parametrize("command", ["init", "list"])
    def test_invalid_urls(
        self, tmp_path: Path, s3_env: dict[str, str], url: str, needle: str, command: str
    ) -> None:
        """An s3:// URL S3 would refuse is a usage error (exit 2) before any request."""
        env = host_env(s3_env, tmp_path / "cache", AWS_ENDPOINT_URL="http://127.0.0.1:9")
        work = tmp_path / "cwd"
        work.mkdir()
        proc = subprocess.run(
            cli_argv(command, url), capture_output=True, text=True, env=cli_env(env), cwd=work
        )
        assert_one_line_error(proc, needle)
        assert proc.returncode == 2
        assert not (tmp_path / "cache").exists()
        assert list(work.iterdir()) == []  # no ./S3:/... either

    def test_missing_bucket(self, tmp_path: Path, s3_env: dict[str, str]) -> None:
        """A bucket that does not exist: one line naming it, for every command."""
        env = host_env(s3_env, tmp_path / "cache")
        for args in (
            ["list", "s3://repofs-no-such-bucket/r"],
            ["stats", "s3://repofs-no-such-bucket/r"],
        ):
            proc = repofs(*args, env=env, check=False)
            assert_one_line_error(proc, "repofs-no-such-bucket", "no such bucket")
        assert not (tmp_path / "cache").exists()

    def test_init_refuses_a_repository_or_other_objects(
        self, tmp_path: Path, s3_server: S3Server, s3_env: dict[str, str], s3_bucket: str
    ) -> None:
        """init never writes into a prefix that holds a repository or anything else."""
        env = host_env(s3_env, tmp_path / "cache")
        repofs("init", f"s3://{s3_bucket}/repo", env=env)
        s3_server.client().put_object(Bucket=s3_bucket, Key="other/data.bin", Body=b"x")
        before = {k: v for k, v in _objects(s3_server, s3_bucket).items()}
        proc = repofs("init", f"s3://{s3_bucket}/repo", env=env, check=False)
        assert_one_line_error(proc, "already exists")
        proc = repofs("init", f"s3://{s3_bucket}/other", env=env, check=False)
        assert_one_line_error(proc, "holds objects")
        proc = repofs("init", f"s3://{s3_bucket}", env=env, check=False)
        assert_one_line_error(proc, "holds objects")
        for inner in ("repo/leases", "repo/packs/00", "repo/x/y"):  # gc there would eat it
            proc = repofs("init", f"s3://{s3_bucket}/{inner}", env=env, check=False)
            assert_one_line_error(proc, "inside the repository", f"s3://{s3_bucket}/repo")
        assert _objects(s3_server, s3_bucket) == before

    def test_init_after_an_interrupted_init(
        self, tmp_path: Path, s3_server: S3Server, s3_env: dict[str, str], s3_bucket: str
    ) -> None:
        """An init killed between its key and its config: the next init says what to delete."""
        env = host_env(s3_env, tmp_path / "cache")
        s3_server.client().put_object(Bucket=s3_bucket, Key="repo/key", Body=b"{}")
        proc = repofs("init", f"s3://{s3_bucket}/repo", env=env, check=False)
        assert_one_line_error(proc, "interrupted init", f"s3://{s3_bucket}/repo/key")
        s3_server.client().delete_object(Bucket=s3_bucket, Key="repo/key")
        repofs("init", f"s3://{s3_bucket}/repo", env=env)

    def test_missing_repository_and_wrong_passphrase(
        self, tmp_path: Path, s3_env: dict[str, str], s3_url: str
    ) -> None:
        """No repository at a valid prefix, a wrong passphrase: one line each, no cache made."""
        env = host_env(s3_env, tmp_path / "cache")
        proc = repofs("list", s3_url, env=env, check=False)
        assert_one_line_error(proc, "not a repofs repository")
        assert not (tmp_path / "cache").exists()
        repofs("init", s3_url, env=host_env(s3_env, tmp_path / "init-cache"))
        wrong = host_env(s3_env, tmp_path / "cache", REPOFS_PASSPHRASE="not the passphrase")
        for args in (["list", s3_url], ["ingest", s3_url, "--vm", "v", f"d={_disk(tmp_path)}"]):
            proc = repofs(*args, env=wrong, check=False)
            assert_one_line_error(proc, "passphrase")
        assert not (tmp_path / "cache").exists()


def _objects(server: S3Server, bucket: str) -> dict[str, bytes]:
    from tests.support.s3hosts import bucket_objects

    return bucket_objects(server, bucket)
