"""Repository locks, built on ``flock`` so that a killed process never leaves one behind.

Two lock files make a fair reader-writer lock:

* ``ingest`` and ``prune`` take the repository *shared*: several may run at
  once (LMDB serialises their commits);
* the final phase of ``gc`` and ``rebuild-index`` take it *exclusive*.

Every taker first holds ``lock.gate`` exclusively while it queues on
``lock.main``, then releases the gate once it has the main lock (shared
takers) or keeps it (exclusive takers).  A waiting gc therefore holds the
gate, so no new ingest overtakes it, and it cannot be starved.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sys
from collections.abc import Iterator

from repofs.durable import os_error
from repofs.errors import BusyError

GATE = "lock.gate"
MAIN = "lock.main"
KEEP = "lock.keep"


def open_lock_file(path: str) -> int:
    """Open (creating) a lock file; a one-line error where that fails."""
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:  # a read-only file system, a lock file turned into a directory
        raise os_error(exc, path) from None


def _acquire(fd: int, mode: int, wait: bool, what: str) -> None:
    try:
        fcntl.flock(fd, mode | fcntl.LOCK_NB)
        return
    except BlockingIOError:
        if not wait:
            raise BusyError(f"{what}; try again later") from None
    print(f"repofs: waiting: {what}", file=sys.stderr, flush=True)
    fcntl.flock(fd, mode)


@contextlib.contextmanager
def repository_lock(repo_path: str, *, exclusive: bool, wait: bool = True) -> Iterator[None]:
    """Hold the repository shared (ingest, prune) or exclusive (gc sweep, rebuild-index)."""
    gate = open_lock_file(os.path.join(repo_path, GATE))
    try:
        main = open_lock_file(os.path.join(repo_path, MAIN))
    except BaseException:
        os.close(gate)
        raise
    try:
        busy = (
            "the repository is busy with gc or rebuild-index"
            if not exclusive
            else ("the repository is in use by an ingest, prune or gc")
        )
        _acquire(gate, fcntl.LOCK_EX, wait, busy)
        _acquire(main, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH, wait, busy)
        if not exclusive:
            fcntl.flock(gate, fcntl.LOCK_UN)
        yield
    finally:
        os.close(main)
        os.close(gate)


@contextlib.contextmanager
def keep_lock(repo_path: str) -> Iterator[None]:
    """Held by prune, delete, protect and unprotect, one at a time, inside the shared lock.

    They decide from the index and then write records that rebuild-index
    obeys (tombstones, protection records) before their index transaction.
    Between one's decision and its transaction another must not change
    the same restore points: a prune that planned to remove a restore point
    that was protected meanwhile would leave a tombstone beside a protected
    restore point, which the next rebuild-index would drop.  They are short,
    so a second one waits.
    """
    fd = open_lock_file(os.path.join(repo_path, KEEP))
    try:
        _acquire(fd, fcntl.LOCK_EX, True, "another prune, delete or protect is running")
        yield
    finally:
        os.close(fd)
