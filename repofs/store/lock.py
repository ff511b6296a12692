"""Repository locks, built on ``flock`` so that a killed process never leaves one behind.

Two lock files make a fair reader-writer lock:

* ``ingest``, ``prune``, ``verify`` and ``gc`` take the repository *shared*:
  any number may run at once (LMDB serialises their commits; gc never stops
  an ingest, see ``docs/maintenance.md``);
* ``rebuild-index`` takes it *exclusive*: it replaces the index.

Every taker first holds ``lock.gate`` exclusively while it queues on
``lock.main``, then releases the gate once it has the main lock (shared
takers) or keeps it (exclusive takers).  A waiting rebuild-index therefore
holds the gate, so no new command overtakes it, and it cannot be starved.

``--lock-wait SECONDS`` (:func:`set_lock_wait`) bounds every wait: flock has
no timeout, so a bounded wait polls with ``LOCK_NB``.  Giving up raises
:class:`BusyError` before the command has changed anything.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from repofs.errors import BusyError
from repofs.store.durable import os_error

GATE = "lock.gate"
MAIN = "lock.main"
KEEP = "lock.keep"
POLL_SECONDS = 0.05  #: how often a bounded wait tries the lock again

#: Seconds a command waits for the repository lock; None waits as long as it takes.
_lock_wait: float | None = None


def set_lock_wait(seconds: float | None) -> None:
    """Bound every later wait for the repository lock in this process (``--lock-wait``)."""
    global _lock_wait
    _lock_wait = seconds


def open_lock_file(path: str) -> int:
    """Open (creating) a lock file; a one-line error where that fails."""
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:  # a read-only file system, a lock file turned into a directory
        raise os_error(exc, path) from None


def _acquire(fd: int, mode: int, wait: bool, what: str, deadline: float | None = None) -> bool:
    """Take the lock; False if it was free at once, True if we had to wait for it."""
    try:
        fcntl.flock(fd, mode | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        if not wait:
            raise BusyError(f"{what}; try again later") from None
    if deadline is None:
        print(f"repofs: waiting: {what}", file=sys.stderr, flush=True)
        fcntl.flock(fd, mode)
        return True
    print(f"repofs: waiting: {what} (at most {_lock_wait:g} s)", file=sys.stderr, flush=True)
    while True:
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BusyError(
                    f"gave up after waiting {_lock_wait:g} s (--lock-wait): {what}"
                ) from None
            time.sleep(min(POLL_SECONDS, left))


@contextlib.contextmanager
def repository_lock(repo_path: str, *, exclusive: bool, wait: bool = True) -> Iterator[None]:
    """Hold the repository shared (ingest, prune, verify, gc) or exclusive (rebuild-index).

    A command that read the index before it took the lock must look again
    once it holds it: rebuild-index may have replaced the index meanwhile
    (:meth:`repofs.store.repository.Repository.lock` does that).
    """
    gate = open_lock_file(os.path.join(repo_path, GATE))
    try:
        main = open_lock_file(os.path.join(repo_path, MAIN))
    except BaseException:
        os.close(gate)
        raise
    try:
        busy = (
            "the repository is busy with rebuild-index"
            if not exclusive
            else ("the repository is in use by an ingest, prune, verify or gc")
        )
        deadline = None if _lock_wait is None else time.monotonic() + _lock_wait
        _acquire(gate, fcntl.LOCK_EX, wait, busy, deadline)
        _acquire(main, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH, wait, busy, deadline)
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
    deadline = None if _lock_wait is None else time.monotonic() + _lock_wait
    try:
        _acquire(fd, fcntl.LOCK_EX, True, "another prune, delete or protect is running", deadline)
        yield
    finally:
        os.close(fd)


@dataclass(frozen=True)
class LockHolder:
    """A process that holds (or queues for) one of a repository's lock files."""

    file: str  #: the lock file's name, e.g. ``lock.main``
    mode: str  #: ``shared`` or ``exclusive``
    pid: int  #: as this process's PID namespace sees it; 0 when it cannot see the holder
    waiting: bool  #: queued for the lock, not holding it yet
    command: str  #: the holder's command line, "" when unknown


def lock_holders(repo_path: str, names: Iterable[str]) -> list[LockHolder] | None:
    """Who holds the lock files ``names`` of a repository, from ``/proc/locks``.

    Read without taking any lock: even a non-blocking try would, for its
    instant, make a starting ingest or gc print "waiting" (or fail it,
    without waiting).  None when ``/proc/locks`` cannot be read.  A lock
    file that does not exist yet is held by nobody.
    """
    wanted: dict[tuple[int, int, int], str] = {}
    for name in names:
        try:
            st = os.stat(os.path.join(repo_path, name))
        except OSError:
            continue
        wanted[(os.major(st.st_dev), os.minor(st.st_dev), st.st_ino)] = name
    try:
        with open("/proc/locks", encoding="ascii", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    out: list[LockHolder] = []
    for line in lines:
        # "1: FLOCK  ADVISORY  WRITE 1234 fe:00:5678 0 EOF"; a waiter has "->" after the number
        fields = line.split()
        waiting = len(fields) > 1 and fields[1] == "->"
        if waiting:
            del fields[1]
        if len(fields) < 6 or fields[1] != "FLOCK":
            continue
        try:
            major, minor, ino = fields[5].split(":")
            key = (int(major, 16), int(minor, 16), int(ino))
            pid = int(fields[4])
        except ValueError:
            continue
        if key in wanted:
            mode = "exclusive" if fields[3] == "WRITE" else "shared"
            out.append(LockHolder(wanted[key], mode, pid, waiting, _command_of(pid)))
    return sorted(out, key=lambda h: (h.file, h.waiting, h.pid))


def _command_of(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            raw = f.read(4096)
    except OSError:
        return ""
    # one line, however the holder was started (python -c with a script spans several)
    text = " ".join(raw.decode(errors="replace").replace("\0", " ").split())
    return text if len(text) <= 120 else text[:119] + "…"
