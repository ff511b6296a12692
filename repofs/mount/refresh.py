"""Keeping a mount of a bucket current: a thread that syncs this host's cache now and then.

Other hosts commit restore points, and prune, delete or gc them, by writing
to the bucket's log; a mount learns of it only by syncing (LIST the log, GET
and apply what is new).  The tree is read from the cache's index on every
request, so what a sync applied shows at the next ``ls``: a new restore
point appears, a pruned one disappears, within the refresh interval.

Never on the FUSE event loop: a sync waits for the object store.  An
endpoint that is down fails the sync, which is logged once per outage and
retried at the next interval; the mount meanwhile serves what the cache
holds (reads of chunks not cached on this host fail with EIO).
"""

from __future__ import annotations

import logging
import threading

from repofs.errors import RepofsError
from repofs.store.repository import Repository

DEFAULT_REFRESH = 30.0  #: seconds between syncs (``mount --refresh``)
STOP_WAIT = 10.0  #: at unmount, the longest wait for a sync under way
log = logging.getLogger("repofs.mount.refresh")


class Refresher:
    """Calls ``repo.sync()`` every ``interval`` seconds on a thread of its own until stopped."""

    def __init__(self, repo: Repository, interval: float) -> None:
        self._repo = repo
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="repofs-sync", daemon=True)
        self.failing = False  #: whether the last sync failed (an outage is being logged)
        self.syncs = 0

    def start(self) -> Refresher:
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.refresh()

    def refresh(self) -> None:
        """One sync; failures are logged once per outage and never raised."""
        try:
            applied = self._repo.sync()
        except Exception as exc:  # the thread must live on, whatever one sync met
            if not self.failing:
                self.failing = True
                detail = str(exc) if isinstance(exc, RepofsError) else repr(exc)
                log.error(
                    "cannot sync with %s: %s; serving what this host has, retrying every %g s",
                    self._repo.name,
                    detail,
                    self.interval,
                )
            return
        self.syncs += 1
        if self.failing:
            self.failing = False
            log.warning("sync with %s works again", self._repo.name)
        if applied:
            log.info("applied %d new log object(s) from %s", applied, self._repo.name)

    def stop(self, wait: float = STOP_WAIT) -> None:
        """End the thread, waiting up to ``wait`` seconds for a sync under way.

        The repository is closed next: a sync still writing the index then
        would fail with a confusing error in the log.  One stuck on an
        unreachable endpoint is left behind (the thread is a daemon).
        """
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(wait)
