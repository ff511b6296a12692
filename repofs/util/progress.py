"""A progress line on stderr for people watching a terminal, and silence for scripts.

Hand-written on purpose (issue 19 weighed the libraries; measured with ``python -X importtime``
on top of what ``repofs.cli.main`` already imports, min of 7 runs, December 2026):

- tqdm 4.70: +29 ms (``tqdm.version`` pulls in ``importlib.metadata``), rich 15 ``rich.progress``:
  +27 ms, against about 53 ms for the whole CLI; this module costs 0.2 ms. A lazy import would
  hide that at start-up, but neither draws our line without a custom format that recomputes
  what ``_draw`` computes here (``human_bytes`` sizes, MB/s, ETA), so a dependency would buy
  nothing.
- click's own ``progressbar`` (already a dependency, +5 ms) draws nothing unless its stream is a
  terminal, so ``--progress`` could not force the bar into a pipe (tests/cli/test_cli_output.py
  checks that), and it shows neither bytes nor MB/s.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


class Progress:
    """Bytes done, MB/s and ETA, redrawn at most a few times a second."""

    def __init__(
        self, total: int, label: str = "", stream: TextIO | None = None, enabled: bool | None = None
    ) -> None:
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.total = total
        self.done = 0
        self.label = label
        self._start = time.monotonic()
        self._last = 0.0

    def add_total(self, n: int) -> None:
        self.total += n

    def update(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if self.enabled and now - self._last >= 0.2:
            self._last = now
            self._draw(now)

    def _draw(self, now: float) -> None:
        elapsed = max(now - self._start, 1e-6)
        rate = self.done / elapsed
        eta = (self.total - self.done) / rate if rate > 0 else 0
        pct = 100.0 * self.done / self.total if self.total else 100.0
        line = (
            f"{self.label}{human_bytes(self.done)} / {human_bytes(self.total)} "
            f"({pct:5.1f}%)  {rate / 1e6:7.1f} MB/s  ETA {int(eta) // 60}:{int(eta) % 60:02d}"
        )
        self.stream.write("\r" + line.ljust(78))
        self.stream.flush()

    def finish(self) -> None:
        if self.enabled:
            self._draw(time.monotonic())
            self.stream.write("\n")
            self.stream.flush()
