from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.helpers import repofs


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A fresh repository with the default settings."""
    path = tmp_path / "repo"
    repofs("init", path)
    return path
