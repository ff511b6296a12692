"""Ctrl-C and SIGTERM: how a command stops, and the moment after which it no longer does."""

from __future__ import annotations

import signal
import threading


class Terminated(KeyboardInterrupt):
    """SIGTERM, turned into an interrupt so it cleans up exactly as Ctrl-C does.

    Schedulers and systemd cancel a job with SIGTERM; by default that killed
    Python on the spot, leaving an unpublished pack in ``packs/tmp`` and
    the ingest's reservation for gc to find.
    """


_installed = False


def _on_stop(signum: int, _frame: object) -> None:
    raise Terminated if signum == signal.SIGTERM else KeyboardInterrupt


def install() -> None:
    """SIGTERM stops a command as Ctrl-C does (an inherited SIG_IGN stays)."""
    global _installed
    _installed = True
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _on_stop)


def ignore_from_now_on() -> None:
    """Called just before a commit: a stop request after it is ignored.

    A SIGTERM that came just after an ingest committed made it exit 143
    with the restore point stored and its id printed; a backup wrapper
    takes that for a failure and runs the job again, for a duplicate.  From
    the commit on, the command's exit status is the commit's.  SIG_IGN, not
    a handler that returns: Python puts its handlers back to the default
    while it shuts down, and a SIGTERM then killed the finished ingest.
    Without :func:`install` (the library used in-process) this changes
    nothing.
    """
    if _installed and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
