"""Helpers of the maintenance tests on a bucket: a small repository, its cache, damage to objects.

The bucket is real (the SeaweedFS server of ``tests/conftest.py``); the
cache is a per-test directory given through ``REPOFS_CACHE_DIR``, so each
test is one host, and a second cache directory is a second host.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.support.helpers import cli_env, make_image, repofs
from tests.support.maint import MiB, noise
from tests.support.s3server import S3Server


@dataclass
class S3Repo:
    """A repository in a fresh bucket, seen from one host (its cache)."""

    url: str
    server: S3Server
    bucket: str
    prefix: str
    env: dict[str, str]
    cache: Path
    image: Path

    def run(self, *args: str, check: bool = True, env: dict[str, str] | None = None) -> Any:
        """The real CLI on this repository's host (``REPO`` is not added: name it)."""
        return repofs(*args, check=check, env={**self.env, **(env or {})})

    def ingest(self, vm: str = "web") -> str:
        out = self.run("ingest", self.url, "--vm", vm, f"d0={self.image}").stdout
        return out.strip().splitlines()[-1]

    def keys(self, sub: str) -> list[tuple[str, int]]:
        """Object keys (relative to the prefix) under ``sub``, with their sizes."""
        client = self.server.client()
        out: list[tuple[str, int]] = []
        token: dict[str, str] = {}
        while True:
            resp = client.list_objects_v2(
                Bucket=self.bucket, Prefix=f"{self.prefix}/{sub}", **token
            )
            out += [(o["Key"][len(self.prefix) + 1 :], o["Size"]) for o in resp.get("Contents", [])]
            if not resp.get("IsTruncated"):
                return out
            token = {"ContinuationToken": resp["NextContinuationToken"]}

    def get(self, name: str) -> bytes:
        client = self.server.client()
        return client.get_object(Bucket=self.bucket, Key=f"{self.prefix}/{name}")["Body"].read()

    def put(self, name: str, data: bytes) -> None:
        self.server.client().put_object(Bucket=self.bucket, Key=f"{self.prefix}/{name}", Body=data)

    def delete(self, name: str) -> None:
        self.server.client().delete_object(Bucket=self.bucket, Key=f"{self.prefix}/{name}")

    def flip(self, name: str, offset: int) -> None:
        """Flip one byte of an object in place (same size: only a re-hash sees it)."""
        data = bytearray(self.get(name))
        data[offset] ^= 0xFF
        self.put(name, bytes(data))

    def verify_json(self, *extra: str) -> tuple[int, dict[str, Any]]:
        proc = self.run("verify", self.url, "--json", *extra, check=False)
        return proc.returncode, json.loads(proc.stdout)


def new_s3_repo(
    server: S3Server, bucket: str, env: dict[str, str], tmp_path: Path, name: str = "host1"
) -> S3Repo:
    """An encrypted repository with 64 KiB chunks in ``bucket``, seen from the host ``name``."""
    cache = tmp_path / f"cache-{name}"
    host_env = {**env, "REPOFS_CACHE_DIR": str(cache)}
    image = make_image(tmp_path / "web.img", 4 * MiB, [(0, noise(2 * MiB, 1))])
    r = S3Repo(f"s3://{bucket}/repo", server, bucket, "repo", host_env, cache, image)
    r.run("init", "--chunk-size", "64K", r.url)
    return r


def second_host(r: S3Repo, tmp_path: Path, name: str = "host2") -> S3Repo:
    """The same repository seen from another host: a cache of its own."""
    cache = tmp_path / f"cache-{name}"
    env = {**r.env, "REPOFS_CACHE_DIR": str(cache)}
    return S3Repo(r.url, r.server, r.bucket, r.prefix, env, cache, r.image)


def chunk_in_pack(r: S3Repo) -> tuple[str, int, int]:
    """(pack object name, record offset, stored length) of one chunk, from this host's cache."""
    from repofs.store.index import Index
    from repofs.store.records import RecordType
    from repofs.store.s3packs import pack_name
    from repofs.store.schema import decode_location, key_type

    index = Index(str(r.cache / "index"))
    try:
        with index.reading() as txn:
            for key, value in index.items(txn, "objects"):
                if key_type(key) == RecordType.CHUNK:
                    loc = decode_location(value)
                    if loc.stored_len > 1024:
                        return pack_name(loc.pack_id), loc.offset, loc.stored_len
    finally:
        index.close()
    raise AssertionError("no chunk in the cache")


_SEQS = """
import json, sys
from repofs.store.location import set_s3_settings
from repofs.store.opening import open_repository
set_s3_settings(cache_dir=sys.argv[2])
with open_repository(sys.argv[1]) as repo:
    print(json.dumps(sorted([rp.vm, rp.id, rp.seq, rp.vm_seq] for rp in repo.restore_points())))
"""


def rp_seqs(r: S3Repo) -> list[list[Any]]:
    """[vm, id, seq, vm_seq] of every restore point in this host's cache (inode numbers)."""
    proc = subprocess.run(
        [sys.executable, "-c", _SEQS, r.url, str(r.cache)],
        capture_output=True,
        text=True,
        env=cli_env(r.env),
        check=True,
    )
    return json.loads(proc.stdout)


_CHECKPOINT = """
import sys
from repofs.store.location import set_s3_settings
from repofs.store.opening import open_repository
set_s3_settings(cache_dir=sys.argv[2])
with open_repository(sys.argv[1]) as repo:
    print(repo.log.write_checkpoint())
"""


def write_checkpoint(r: S3Repo) -> str:
    """Write a checkpoint now (commits write one only every 64 log objects); its name."""
    proc = subprocess.run(
        [sys.executable, "-c", _CHECKPOINT, r.url, str(r.cache)],
        capture_output=True,
        text=True,
        env=cli_env(r.env),
        check=True,
    )
    return proc.stdout.strip()
