"""Helpers for tests of repositories in a bucket: simulated hosts, bucket listings, mounts.

A "host" is an environment for CLI subprocesses with its own cache directory
(``XDG_CACHE_HOME``): two hosts share nothing but the bucket, as two machines
would.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

from tests.support.helpers import cli_argv, cli_env, is_mounted, repofs, unmount
from tests.support.s3server import S3Server


def host_env(base: dict[str, str], cache: Path, **extra: str) -> dict[str, str]:
    """``base`` (an s3_env) with its own cache directory and ``extra`` variables."""
    env = dict(base)
    env["XDG_CACHE_HOME"] = str(cache)
    env.update(extra)
    return env


def ingest_s3(
    url: str, vm: str, env: dict[str, str], *disks: str, extra: tuple[str, ...] = ()
) -> str:
    """Ingest and return the new restore point id (the last line of stdout)."""
    out = repofs("ingest", url, "--vm", vm, *disks, *extra, env=env).stdout
    return out.strip().splitlines()[-1]


def listed(url: str, env: dict[str, str], vm: str | None = None) -> list[tuple[str, str]]:
    """(vm, id) of every restore point ``repofs list --json`` shows, in its order."""
    args = ["list", url, "--json", *([vm] if vm else [])]
    return [(d["vm"], d["id"]) for d in json.loads(repofs(*args, env=env).stdout)]


def bucket_objects(server: S3Server, bucket: str) -> dict[str, bytes]:
    """Every object in ``bucket`` (name -> bytes), read with the server's own client."""
    client = server.client()
    out: dict[str, bytes] = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for item in page.get("Contents", ()):
            key = item["Key"]
            out[key] = client.get_object(Bucket=bucket, Key=key)["Body"].read()
    return out


def bucket_names(server: S3Server, bucket: str) -> list[str]:
    client = server.client()
    names: list[str] = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        names += [item["Key"] for item in page.get("Contents", ())]
    return names


@contextlib.contextmanager
def mounted_s3(url: str, mountpoint: Path, env: dict[str, str], *extra: str) -> Iterator[Path]:
    """A real FUSE mount of a bucket repository, always unmounted afterwards."""
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


def spawn_s3(*args: str | os.PathLike[str], env: dict[str, str]) -> subprocess.Popen[str]:
    """Start the CLI without waiting, stderr line-buffered for the test hook's line."""
    return subprocess.Popen(
        cli_argv(*args),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=cli_env(env),
        stdin=subprocess.DEVNULL,
    )


def wait_for_line(proc: subprocess.Popen[str], needle: str, timeout: float = 60) -> None:
    """Read ``proc``'s stderr until a line holds ``needle`` (the test hook's announcement)."""
    assert proc.stderr is not None
    deadline = time.monotonic() + timeout
    seen = []
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            raise AssertionError(f"process ended before {needle!r}:\n{''.join(seen)}")
        seen.append(line)
        if needle in line:
            return
    raise AssertionError(f"no {needle!r} within {timeout} s:\n{''.join(seen)}")
