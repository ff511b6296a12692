"""Leases in a bucket: how a writer on one host tells gc on another that it is still running.

On a local repository a writer's process id says it runs; hosts sharing a
bucket cannot see each other's processes, so each writer (an ingest, a
prune, a verify) keeps an object ``leases/<random>`` that it renews every
``ttl / 3`` seconds and deletes when it ends.  gc takes a lease for alive
while ``renewed + ttl + skew`` lies in the future by gc's own clock
(``skew`` covers clocks that disagree), and deletes nothing such a writer
could still use (``docs/object-storage.md``, "gc across hosts").

A writer whose renewals fail for longer than its ttl may already be given
up by gc: it must not commit (:meth:`Lease.check`).
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

from repofs.errors import RepofsError, RepositoryError
from repofs.store.bucket import Bucket, ObjectMissing
from repofs.store.crypto import Keys
from repofs.store.segment import Segment

LEASES_PREFIX = "leases/"
DEFAULT_TTL = 600.0
DEFAULT_SKEW = 300.0


def lease_ttl() -> float:
    """How long a lease lasts unrenewed (``REPOFS_S3_LEASE_TTL``; tests shorten it)."""
    return _env_seconds("REPOFS_S3_LEASE_TTL", DEFAULT_TTL)


def clock_skew() -> float:
    """How far hosts' clocks may disagree (``REPOFS_S3_CLOCK_SKEW``)."""
    return _env_seconds("REPOFS_S3_CLOCK_SKEW", DEFAULT_SKEW)


@dataclass(frozen=True)
class LeaseInfo:
    name: str
    what: str
    host: str
    pid: int
    started: float
    renewed: float
    ttl: float

    def alive(self, now: float, skew: float) -> bool:
        return self.renewed + self.ttl + skew > now


class Lease:
    """A running writer's lease; a thread renews it until :meth:`end`."""

    def __init__(self, bucket: Bucket, keys: Keys, what: str) -> None:
        self._bucket = bucket
        self._keys = keys
        self.what = what
        self.name = LEASES_PREFIX + os.urandom(16).hex()
        self.ttl = lease_ttl()
        self.started = time.time()
        self._renewed_mono = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.error: str | None = None
        self.lapsed = False  #: renewals failed for a ttl once: gc may have given it up

    def start(self) -> Lease:
        """Write the lease (returns once the store has it) and start renewing it."""
        self._write()
        self._thread = threading.Thread(target=self._renew, name="repofs-lease", daemon=True)
        self._thread.start()
        return self

    def _write(self) -> None:
        mono = time.monotonic()
        doc = {
            "what": self.what,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": self.started,
            "renewed": time.time(),
            "ttl": self.ttl,
        }
        self._bucket.put(self.name, Segment("lease", extra=doc).encode(self._keys, self.name))
        self._renewed_mono = mono

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            before = self._renewed_mono
            try:
                self._write()
                self.error = None
            except RepofsError as exc:  # retried at the next tick; check() decides
                self.error = str(exc)
                continue
            if time.monotonic() - before >= self.ttl:
                # Renewed again, but the new object landed a ttl after the one before
                # was written (failures, or a PUT retried that long): gc may have taken
                # this writer for gone and deleted what it uploaded.  It must not commit.
                self.lapsed = True

    def check(self) -> None:
        """Refuse to go on if the lease may have expired: gc could have given this writer up."""
        left = self.ttl - (time.monotonic() - self._renewed_mono)
        if self.lapsed:
            raise RepositoryError(
                f"lost the lease of this {self.what} (its renewals failed for longer than "
                f"{self.ttl:.0f} s, so gc may have taken it for gone); nothing was committed, "
                "run it again"
            )
        if left < self.ttl / 6:
            raise RepositoryError(
                f"lost the lease of this {self.what} (not renewed for "
                f"{time.monotonic() - self._renewed_mono:.0f} s"
                + (f": {self.error}" if self.error else "")
                + "); nothing was committed, run it again"
            )

    def end(self) -> None:
        """Stop renewing and remove the lease; a failure leaves it to expire."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        with contextlib.suppress(RepofsError):
            self._bucket.delete(self.name)


def list_leases(bucket: Bucket, keys: Keys) -> Iterator[LeaseInfo]:
    """Every lease in the bucket; one that does not open counts as renewed at its LastModified."""
    for info in bucket.list(LEASES_PREFIX):
        try:
            raw = bucket.get(info.name)
        except ObjectMissing:
            continue  # ended since the listing
        try:
            doc = Segment.decode(raw, keys, info.name, info.name).extra
            yield LeaseInfo(
                info.name,
                str(doc.get("what", "?")),
                str(doc.get("host", "?")),
                int(doc.get("pid", 0)),
                float(doc["started"]),
                float(doc["renewed"]),
                float(doc["ttl"]),
            )
        except (RepofsError, KeyError, TypeError, ValueError):
            # Unreadable: the safe reading is "started long ago,
            # renewed at its LastModified", so it holds gc off for one ttl.
            yield LeaseInfo(info.name, "?", "?", 0, 0.0, info.mtime, lease_ttl())


def _env_seconds(name: str, default: float) -> float:
    try:
        return max(0.5, float(os.environ.get(name, "")))
    except ValueError:
        return default
