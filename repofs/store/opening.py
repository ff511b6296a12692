"""Opening a repository by what the user typed: a directory, or ``s3://BUCKET/PREFIX``.

The one place that knows both kinds, so that neither
:mod:`repofs.store.repository` nor :mod:`repofs.store.s3repo` imports the
other's caller; every command opens through here.
"""

from __future__ import annotations

from repofs.store import crypto
from repofs.store.config import PACK_TARGET
from repofs.store.location import is_s3, refuse_other_urls
from repofs.store.repository import Repository


def open_repository(repo: str, keys: crypto.Keys | None = None) -> Repository:
    """The repository ``repo`` names, opened (and, in a bucket, this host's cache synced)."""
    refuse_other_urls(repo)
    if is_s3(repo):
        from repofs.store.s3repo import S3Repository  # boto3 only for a bucket

        return S3Repository.open_bucket(repo, keys)
    return Repository.open(repo, keys)


def init_repository(
    repo: str,
    chunk_size: int,
    compression: str,
    encryption: str = crypto.DEFAULT_CIPHER,
    *,
    create_bucket: bool = False,
    pack_size: int = PACK_TARGET,
) -> Repository:
    """Create the repository ``repo`` names and return it open."""
    refuse_other_urls(repo)
    if is_s3(repo):
        from repofs.store.s3repo import S3Repository

        return S3Repository.init_bucket(
            repo,
            chunk_size,
            compression,
            encryption,
            create_bucket=create_bucket,
            pack_size=pack_size,
        )
    return Repository.init(
        repo, chunk_size, compression, encryption, create_bucket=create_bucket, pack_size=pack_size
    )
