"""The package layout of issue 19 keeps its arrows: no import cycles, nothing imported upward."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

#: The checkout; not tests.helpers' REPO_ROOT, which the layout change moves to tests/support/.
REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(
    not (REPO_ROOT / "repofs" / "store").is_dir(),
    reason="repofs/store/ does not exist yet: tools/check_layers.py checks the layout of issue 19, "
    "which the one-shot restructure script creates",
)
def test_layers_hold() -> None:
    """tools/check_layers.py finds no cycle and no import from a lower layer into a higher one."""
    proc = subprocess.run(
        [sys.executable, "tools/check_layers.py"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
