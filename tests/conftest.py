from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.support.helpers import repofs

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
