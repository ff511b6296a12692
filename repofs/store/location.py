"""Where a repository lives: a local directory, or ``s3://BUCKET/PREFIX``, and the S3 settings.

Every command takes REPO as text; this module tells the two kinds apart and
holds the per-process settings a bucket needs beside its URL (endpoint,
cache directory and size, rate limits).  The CLI sets them from its options
once, the way ``--lock-wait`` is set, so no function between the command
line and :class:`repofs.store.bucket.Bucket` has to pass them along.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, replace

from repofs.errors import UsageError

S3_SCHEME = "s3://"
#: S3's bucket naming rules (3-63 characters, lowercase letters, digits, dots and hyphens).
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
DEFAULT_CACHE_SIZE = 8 << 30  # bytes of chunks kept on disk per repository and host


@dataclass(frozen=True)
class S3Location:
    """A repository in a bucket: every key it owns starts with ``prefix/`` (or is at the top)."""

    bucket: str
    prefix: str

    @property
    def url(self) -> str:
        return (
            f"{S3_SCHEME}{self.bucket}/{self.prefix}"
            if self.prefix
            else f"{S3_SCHEME}{self.bucket}"
        )

    def key(self, name: str) -> str:
        """The bucket key of ``name`` inside the repository."""
        return f"{self.prefix}/{name}" if self.prefix else name


#: ``scheme:/...``: what a URL looks like, typos (``S3://``, ``s3:/``) included.
_URL_LIKE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:/")


def is_s3(repo: str) -> bool:
    return repo.startswith(S3_SCHEME)


def refuse_other_urls(repo: str) -> None:
    """A usage error for a URL that is not ``s3://`` (``S3://b/p``, ``s3:/b/p``, ``https://``).

    Taken for a directory, it named ``./S3:/b/p``: init made a local
    repository there, or said its parent directory does not exist.
    """
    if not is_s3(repo) and _URL_LIKE.match(repo):
        raise UsageError(
            f"{repo}: not an s3://BUCKET/PREFIX URL (the only kind repofs reads, in lower "
            "case); write ./NAME for a directory whose name has a colon"
        )


def parse_s3(repo: str) -> S3Location:
    """``s3://BUCKET[/PREFIX]``; a one-line usage error for anything S3 would refuse."""
    rest = repo[len(S3_SCHEME) :]
    bucket, _, prefix = rest.partition("/")
    prefix = prefix.strip("/")
    if not bucket:
        raise UsageError(f"{repo}: no bucket named: expected s3://BUCKET/PREFIX")
    if not _BUCKET.match(bucket) or ".." in bucket:
        raise UsageError(
            f"{repo}: {bucket!r} is not a valid bucket name "
            "(3-63 lowercase letters, digits, dots or hyphens)"
        )
    if "//" in prefix or any(part in (".", "..") for part in prefix.split("/")):
        raise UsageError(f"{repo}: the prefix {prefix!r} has an empty, '.' or '..' part")
    if len(prefix) > 512:
        raise UsageError(f"{repo}: the prefix is longer than 512 characters")
    return S3Location(bucket, prefix)


@dataclass(frozen=True)
class S3Settings:
    """What a bucket needs besides its URL; from the CLI options, else the environment."""

    endpoint: str | None = None  #: ``--s3-endpoint``; None: boto3's (AWS_ENDPOINT_URL, profile)
    cache_dir: str | None = None  #: ``--cache-dir``; None: ``$XDG_CACHE_HOME/repofs/<id>``
    cache_size: int = DEFAULT_CACHE_SIZE
    limit_upload: int | None = None  #: bytes per second
    limit_download: int | None = None


_settings = S3Settings()


def s3_settings() -> S3Settings:
    return _settings


def set_s3_settings(**changes: object) -> None:
    """Change the process's S3 settings (the CLI, once per command; tests)."""
    global _settings
    _settings = replace(_settings, **changes)  # type: ignore[arg-type]


def cache_root() -> str:
    """The directory under which each repository's per-host cache lives."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "repofs")


def cache_dir_for(repository_id: str) -> str:
    """This host's cache of the repository ``repository_id``."""
    chosen = _settings.cache_dir
    return chosen if chosen else os.path.join(cache_root(), repository_id)
