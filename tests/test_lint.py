"""The code stays ruff clean: the suite fails when it is not."""

from __future__ import annotations

import subprocess
import sys

from tests.support.helpers import REPO_ROOT


def test_ruff_is_clean() -> None:
    """ruff finds nothing in the package, the readers, the tools and the tests."""
    proc = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "repofs", "ingest", "tools", "tests"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
