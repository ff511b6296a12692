"""The few S3 calls repofs makes, with retries, rate limits and one-line errors.

repofs uses PutObject (plain, and with ``If-None-Match: *`` for the one
write that makes a restore point visible), GetObject with a byte range,
HeadObject, ListObjectsV2, DeleteObject, HeadBucket and CreateBucket: the
subset AWS S3, Ceph RGW, MinIO, Garage and SeaweedFS all speak.

Every :class:`Bucket` counts its requests and bytes (:attr:`Bucket.counts`).
With ``REPOFS_S3_STATS=FILE`` in the environment, a process that used a
bucket appends one JSON line to FILE when it exits normally: ``{"pid",
"command", "counts"}`` with the sums over its buckets.  ``tools/bench --s3``
reads them to report requests per GiB ingested and restored; a forked
mount daemon leaves through ``os._exit`` and writes nothing, so the bench
mounts with ``--foreground``.

boto3 is the client: it reads the endpoint, region and credentials the way
administrators already configure them (``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, ``AWS_PROFILE``, the shared
credentials file) and retries transient failures (HTTP 500, 503 SlowDown,
timeouts, connection resets) with exponential backoff and full jitter
("standard" retry mode).  What is still failing after the last attempt
becomes one :class:`ObjectStoreError` line naming the endpoint, bucket and
what went wrong; nothing here returns partial data.
"""

from __future__ import annotations

import atexit
import json
import os
import random
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from repofs.errors import IntegrityError, RepositoryError
from repofs.store.location import S3Location, s3_settings

DEFAULT_ATTEMPTS = 6  #: tries per request, the first included (AWS_MAX_ATTEMPTS overrides)
POOL = 64  #: connections per client: parallel uploads plus the mount's readers
STATS_ENV = "REPOFS_S3_STATS"  #: a file to append this process's request counts to at exit


class ObjectStoreError(RepositoryError):
    """The object store refused or could not be reached (after retries)."""


class ObjectMissing(IntegrityError):
    """A key the caller expected is not in the bucket (404)."""


@dataclass(frozen=True)
class ObjectInfo:
    name: str  #: relative to the repository's prefix
    size: int
    mtime: float  #: LastModified, seconds since the epoch (the server's clock)


class RateLimit:
    """A token bucket in bytes per second, shared by every thread of the process.

    Waiting happens before the transfer, so a burst of one large object
    is followed by a pause as long as the object took "on credit": over
    any minute the average stays at the limit, which is what a link shared
    with production traffic needs.
    """

    def __init__(self, rate: int) -> None:
        self.rate = rate
        self._lock = threading.Lock()
        self._next = time.monotonic()

    def take(self, nbytes: int) -> None:
        with self._lock:
            now = time.monotonic()
            start = max(now, self._next)
            self._next = start + nbytes / self.rate
        if start > now:
            time.sleep(start - now)


class Bucket:
    """One repository's keys in a bucket; thread-safe (one boto3 client, pooled connections)."""

    def __init__(self, location: S3Location) -> None:
        import boto3  # only S3 repositories pay for its import (about 150 ms)
        from botocore.config import Config

        settings = s3_settings()
        self.location = location
        self.endpoint = (
            settings.endpoint
            or os.environ.get("AWS_ENDPOINT_URL_S3")
            or (os.environ.get("AWS_ENDPOINT_URL"))
        )
        attempts = _int_env("AWS_MAX_ATTEMPTS", DEFAULT_ATTEMPTS)
        self.attempts = attempts
        config = Config(
            retries={"total_max_attempts": attempts, "mode": "standard"},
            connect_timeout=_float_env("REPOFS_S3_CONNECT_TIMEOUT", 10.0),
            read_timeout=_float_env("REPOFS_S3_READ_TIMEOUT", 60.0),
            max_pool_connections=POOL,
            tcp_keepalive=True,
            s3={"addressing_style": "path"} if self.endpoint else {},
            # Checksums on every PUT cost a pass over each pack, and not every engine
            # accepts the newer CRC headers: ask for them only where the API needs them.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        try:
            session = boto3.session.Session()
            region = session.region_name or "us-east-1"
            self._client = session.client(
                "s3", endpoint_url=self.endpoint, region_name=region, config=config
            )
        except Exception as exc:  # a bad profile name, a malformed config file
            raise ObjectStoreError(f"{location.url}: cannot set up the S3 client: {exc}") from None
        self._up = RateLimit(settings.limit_upload) if settings.limit_upload else None
        self._down = RateLimit(settings.limit_download) if settings.limit_download else None
        self._count_lock = threading.Lock()
        #: Requests made, by kind (PUT, GET, HEAD, LIST, DELETE), and bytes moved.
        self.counts: Counter[str] = Counter()
        _track(self.counts)

    # -- the calls ---------------------------------------------------------------

    def put(self, name: str, data: bytes | bytearray, *, exclusive: bool = False) -> bool:
        """Store ``data`` under ``name``; with ``exclusive``, only if no object has the name.

        Returns False when ``exclusive`` and the name was taken (HTTP 412).
        Returns True only once the store acknowledged the whole object.
        """
        if self._up is not None:
            self._up.take(len(data))
        extra = {"IfNoneMatch": "*"} if exclusive else {}
        self._count("PUT", len(data))
        try:
            self._client.put_object(
                Bucket=self.location.bucket, Key=self.location.key(name), Body=data, **extra
            )
        except Exception as exc:
            if exclusive and _code(exc) in (
                "PreconditionFailed",
                "412",
                "ConditionalRequestConflict",  # a concurrent conditional write to the key
                "409",
            ):
                return self._ours(name, data)
            raise self._error(exc, "PUT", name) from None
        return True

    def _ours(self, name: str, data: bytes | bytearray) -> bool:
        """Whether a name an exclusive PUT found taken holds exactly ``data``.

        A PUT whose answer was lost (a reset connection, a timeout) is sent
        again by the retry loop, and the store may have done the first one:
        the retry then finds the name taken by this very write.  Callers put
        bodies no other writer produces (sealed with a random nonce, or
        naming a random pack), so equal bytes mean "ours".
        """
        try:
            return self.get(name) == data
        except ObjectMissing:
            return False

    def get(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        """The object's bytes, or ``length`` of them from ``offset``: exactly, or an error.

        botocore retries a request that failed, not a body cut short while
        it is read (a reset connection, a proxy timing out mid-transfer):
        that is retried here, as often and with the same backoff.
        """
        kwargs: dict[str, Any] = {}
        if length is not None:
            if length <= 0:
                return b""
            kwargs["Range"] = f"bytes={offset}-{offset + length - 1}"
        elif offset:
            kwargs["Range"] = f"bytes={offset}-"
        attempt = 0
        while True:
            attempt += 1
            self._count("GET")
            try:
                resp = self._client.get_object(
                    Bucket=self.location.bucket, Key=self.location.key(name), **kwargs
                )
                data = resp["Body"].read()
            except Exception as exc:
                if _code(exc) == "InvalidRange":
                    raise IntegrityError(
                        f"{self.location.url}/{name}: shorter than expected "
                        f"(no bytes at offset {offset})"
                    ) from None
                if _body_cut(exc) and attempt < self.attempts:
                    _backoff(attempt)
                    continue
                raise self._error(exc, "GET", name) from None
            break
        if length is not None and len(data) != length:
            raise IntegrityError(
                f"{self.location.url}/{name}: truncated: {len(data)} of {length} bytes "
                f"at offset {offset}"
            )
        self._count("bytes_down", len(data), request=False)
        if self._down is not None:
            self._down.take(len(data))
        return data

    def head(self, name: str) -> int | None:
        """The object's size, or None if there is none."""
        self._count("HEAD")
        try:
            resp = self._client.head_object(
                Bucket=self.location.bucket, Key=self.location.key(name)
            )
        except Exception as exc:
            if _code(exc) in ("404", "NoSuchKey", "NotFound"):
                return None
            raise self._error(exc, "HEAD", name) from None
        return int(resp["ContentLength"])

    def list(self, sub: str = "", start_after: str | None = None) -> Iterator[ObjectInfo]:
        """Every object whose name starts with ``sub``, in name order, a page (1000) per request."""
        prefix = self.location.key(sub)
        strip = len(self.location.key(""))
        kwargs: dict[str, Any] = {"Bucket": self.location.bucket, "Prefix": prefix}
        if start_after is not None:
            kwargs["StartAfter"] = self.location.key(start_after)
        while True:
            self._count("LIST")
            try:
                resp = self._client.list_objects_v2(**kwargs)
            except Exception as exc:
                raise self._error(exc, "LIST", sub or "/") from None
            for item in resp.get("Contents", ()):
                yield ObjectInfo(
                    item["Key"][strip:], int(item["Size"]), item["LastModified"].timestamp()
                )
            token = resp.get("NextContinuationToken")
            if not resp.get("IsTruncated") or not token:
                return
            kwargs["ContinuationToken"] = token
            kwargs.pop("StartAfter", None)

    def delete(self, name: str) -> None:
        """Remove the object; a name that is already gone is no error (S3 says 204 either way)."""
        self._count("DELETE")
        try:
            self._client.delete_object(Bucket=self.location.bucket, Key=self.location.key(name))
        except Exception as exc:
            if _code(exc) in ("404", "NoSuchKey"):
                return
            raise self._error(exc, "DELETE", name) from None

    def check(self) -> None:
        """Fail with one line unless the bucket exists and these credentials may use it."""
        self._count("HEAD")
        try:
            self._client.head_bucket(Bucket=self.location.bucket)
        except Exception as exc:
            raise self._error(exc, "HEAD", None) from None

    def exists(self) -> bool:
        """Whether the bucket exists (a 404 from HeadBucket); other failures raise."""
        try:
            self.check()
        except ObjectStoreError as exc:
            if getattr(exc, "missing_bucket", False):
                return False
            raise
        return True

    def create(self) -> None:
        """Create the bucket (``init --create-bucket``)."""
        self._count("PUT")
        kwargs: dict[str, Any] = {"Bucket": self.location.bucket}
        region = self._client.meta.region_name
        if region and region != "us-east-1" and not self.endpoint:
            kwargs["CreateBucketConfiguration"] = {"LocationConstraint": region}
        try:
            self._client.create_bucket(**kwargs)
        except Exception as exc:
            if _code(exc) in ("BucketAlreadyOwnedByYou",):
                return
            raise self._error(exc, "CreateBucket", None) from None

    # -- bookkeeping -------------------------------------------------------------

    def _count(self, what: str, nbytes: int = 0, *, request: bool = True) -> None:
        with self._count_lock:
            if request:
                self.counts[what] += 1
            if nbytes and what == "PUT":
                self.counts["bytes_up"] += nbytes
            elif nbytes:
                self.counts[what] += nbytes

    def _error(self, exc: Exception, op: str, name: str | None) -> RepositoryError:
        """One line for a failed call: what, where, and the store's reason."""
        where = f"{self.location.url}/{name}" if name else f"s3://{self.location.bucket}"
        code = _code(exc)
        endpoint = self.endpoint or "the AWS default endpoint"
        cls = type(exc).__name__
        if cls == "NoCredentialsError":
            return ObjectStoreError(
                f"{where}: no S3 credentials: set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or a shared credentials file"
            )
        if cls in (
            "EndpointConnectionError",
            "ConnectTimeoutError",
            "ConnectionClosedError",
            "ReadTimeoutError",
            "ProxyConnectionError",
            "ConnectionError",
        ):
            return ObjectStoreError(f"{where}: cannot reach the S3 endpoint {endpoint} ({exc})")
        if code in ("NoSuchBucket",) or (name is None and code in ("404", "NotFound")):
            err = ObjectStoreError(
                f"s3://{self.location.bucket}: no such bucket at {endpoint} "
                "('repofs init --create-bucket' creates it)"
            )
            err.missing_bucket = True  # type: ignore[attr-defined]
            return err
        if code in ("NoSuchKey", "404", "NotFound"):
            return ObjectMissing(f"{where}: is missing from the bucket")
        if code in (
            "InvalidAccessKeyId",
            "SignatureDoesNotMatch",
            "InvalidToken",
            "ExpiredToken",
            "AuthorizationHeaderMalformed",
        ):
            return ObjectStoreError(
                f"{where}: the S3 endpoint {endpoint} refused the credentials ({code}): "
                "check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or AWS_PROFILE"
            )
        if code in ("AccessDenied", "403", "Forbidden"):
            return ObjectStoreError(
                f"{where}: access denied by {endpoint} ({op}): wrong credentials, or they may "
                "not use this bucket"
            )
        message = _message(exc)
        return ObjectStoreError(f"{where}: S3 {op} failed: {code or cls}{message}")


_tracked: list[Counter[str]] = []
_tracked_lock = threading.Lock()


def _track(counts: Counter[str]) -> None:
    """Remember a bucket's counter for :func:`process_counts` (and the exit report, if asked)."""
    with _tracked_lock:
        if not _tracked and os.environ.get(STATS_ENV):
            atexit.register(_write_stats, os.environ[STATS_ENV])
        _tracked.append(counts)


def process_counts() -> Counter[str]:
    """The requests and bytes of every bucket this process opened, summed."""
    total: Counter[str] = Counter()
    with _tracked_lock:
        for counts in _tracked:
            total.update(counts)
    return total


def _write_stats(path: str) -> None:
    line = json.dumps(
        {"pid": os.getpid(), "command": sys.argv[1:2], "counts": dict(process_counts())}
    )
    try:
        with open(path, "a") as f:
            f.write(line + "\n")
    except OSError:
        pass  # statistics must never turn a finished command into a failed one


def _body_cut(exc: Exception) -> bool:
    """Whether a GET failed while its body was read (worth another try)."""
    return type(exc).__name__ in (
        "ResponseStreamingError",
        "IncompleteReadError",
        "ReadTimeoutError",
        "ConnectionClosedError",
        "ProtocolError",
    )


def _backoff(attempt: int) -> None:
    """Full jitter, as botocore's standard mode: up to 2^attempt x 50 ms, at most 5 s."""
    time.sleep(random.uniform(0, min(5.0, 0.05 * 2**attempt)))


def _code(exc: Exception) -> str:
    response = getattr(exc, "response", None)
    if not isinstance(response, dict):
        return ""
    code = response.get("Error", {}).get("Code")
    if code:
        return str(code)
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return str(status) if status else ""


def _message(exc: Exception) -> str:
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        text = response.get("Error", {}).get("Message")
        if text:
            return f": {text}"
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f": {text}" if text else ""


def _int_env(name: str, default: int) -> int:
    try:
        return max(1, int(os.environ.get(name, "")))
    except ValueError:
        return default


def _float_env(name: str, default: float) -> float:
    try:
        return max(0.1, float(os.environ.get(name, "")))
    except ValueError:
        return default
