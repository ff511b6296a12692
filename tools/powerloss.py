"""Cut the power at every durability point of init, ingest, gc, rebuild-index and prune.

The whole campaign of ``tests/support/powerloss.py`` (the slow test runs the same),
with one summary line per command and one line per cut that broke a
promise.  Exits 1 if any did.  Needs gcc.  See docs/maintenance.md, "Power
loss".  Run from the repository root::

    tools/powerloss [--scenario NAME]... [--sample N] [--dir DIR] [--verbose]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.support.powerloss import CutResult, run_campaign, scenarios, summary  # noqa: E402


def main() -> int:
    known = scenarios()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--scenario", action="append", choices=sorted(known), help="only these (repeatable)"
    )
    parser.add_argument("--sample", type=int, help="cut at N spread-out points, not at all")
    parser.add_argument("--dir", type=Path, help="work here and keep it (default: a temp dir)")
    parser.add_argument("--verbose", action="store_true", help="a line for every cut")
    args = parser.parse_args()
    work = args.dir or Path(tempfile.mkdtemp(prefix="repofs-powerloss-"))
    failed = 0
    try:
        for name in args.scenario or sorted(known):
            t0 = time.monotonic()

            def show(r: CutResult, name: str = name) -> None:
                if args.verbose:
                    what = "ran to the end" if not r.killed else "cut"
                    print(f"  {name} {r.cut}: {what}, {r.error or 'ok'}", flush=True)

            workdir = work / name
            if workdir.exists():
                shutil.rmtree(workdir)
            workdir.mkdir(parents=True)
            campaign = run_campaign(known[name], workdir, sample=args.sample, on_cut=show)
            print(f"{summary(campaign)} ({time.monotonic() - t0:.0f} s)", flush=True)
            failed += len(campaign.failures)
    finally:
        if args.dir is None:
            shutil.rmtree(work, ignore_errors=True)
    print(
        "power loss: every committed restore point survived every cut"
        if not failed
        else f"power loss: {failed} cut(s) broke a promise"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
