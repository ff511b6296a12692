from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.helpers import repofs
from tests.support.s3server import S3Server

# New repositories are encrypted by default: every test (and every CLI subprocess, which
# inherits this environment) has a passphrase, and Argon2id runs with the test hook's
# tiny parameters so that hundreds of repositories cost no time in the KDF.
os.environ.setdefault("REPOFS_PASSPHRASE", "correct horse battery staple")
os.environ["REPOFS_TEST_WEAK_KDF"] = "1"


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A fresh repository with the default settings."""
    path = tmp_path / "repo"
    repofs("init", path)
    return path


# -- S3: one SeaweedFS server for the whole run, a fresh bucket per test -----------------------


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """The run's S3 server (SeaweedFS on loopback ports of its own); stopped at the end."""
    server = S3Server(tmp_path_factory.mktemp("s3server"))
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_bucket(s3_server: S3Server) -> Iterator[str]:
    """A fresh, uniquely named, empty bucket on the run's server (dropped afterwards)."""
    if not s3_server.running:  # a test killed the shared server: give the next one a live one
        s3_server.start()
    name = s3_server.create_bucket(f"repofs-test-{uuid.uuid4().hex[:16]}")
    yield name
    if s3_server.running:
        with contextlib.suppress(Exception):
            s3_server.delete_bucket(name)


@pytest.fixture
def s3_env(s3_server: S3Server) -> dict[str, str]:
    """os.environ plus what a CLI subprocess needs to reach the run's S3 server."""
    env = dict(os.environ)
    env.update(s3_server.env())
    return env


@pytest.fixture
def s3_url(s3_bucket: str) -> str:
    """A repository location on a fresh bucket: s3://<bucket>/repo."""
    return f"s3://{s3_bucket}/repo"


@pytest.fixture
def own_s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A private S3 server for a test that kills or restarts it; stopped afterwards."""
    server = S3Server(tmp_path_factory.mktemp("own-s3server"))
    try:
        server.start()
        yield server
    finally:
        server.stop()
