"""The options of a repository in a bucket, given to every command that opens a repository.

``--s3-endpoint``, ``--cache-dir``, ``--cache-size``, ``--limit-upload`` and
``--limit-download`` set the process's S3 settings
(:func:`repofs.store.location.set_s3_settings`) through callbacks, the way
``--lock-wait`` does, so no command's signature changes; a local
repository ignores them.  Each has an environment variable for scripts
(``REPOFS_CACHE_DIR`` and so on); the endpoint, region and credentials
otherwise follow the AWS conventions (``AWS_ENDPOINT_URL``, ``AWS_PROFILE``).
"""

from __future__ import annotations

from typing import Any

import click

from repofs.errors import UsageError
from repofs.store.config import parse_size
from repofs.store.location import set_s3_settings


def _endpoint(_ctx: click.Context, _param: click.Parameter, value: Any) -> None:
    if value:
        if not value.startswith(("http://", "https://")):
            raise UsageError(f"--s3-endpoint {value!r}: expected http://HOST:PORT or https://...")
        set_s3_settings(endpoint=value)


def _cache_dir(_ctx: click.Context, _param: click.Parameter, value: Any) -> None:
    if value:
        set_s3_settings(cache_dir=value)


def _cache_size(_ctx: click.Context, _param: click.Parameter, value: Any) -> None:
    if value:
        set_s3_settings(cache_size=parse_size(value, "--cache-size"))


def _limit(what: str) -> Any:
    def callback(_ctx: click.Context, _param: click.Parameter, value: Any) -> None:
        if value is not None:
            if value <= 0:
                raise UsageError(f"--limit-{what} must be more than 0 KiB/s")
            set_s3_settings(**{f"limit_{what}": int(value * 1024)})

    return callback


_OPTIONS = (
    (
        "--s3-endpoint",
        "URL",
        str,
        "REPOFS_S3_ENDPOINT",
        _endpoint,
        "S3 endpoint of an s3:// repository (default: AWS_ENDPOINT_URL, else AWS).",
    ),
    (
        "--cache-dir",
        "DIR",
        str,
        "REPOFS_CACHE_DIR",
        _cache_dir,
        "This host's cache of an s3:// repository (default $XDG_CACHE_HOME/repofs/<id>).",
    ),
    (
        "--cache-size",
        "SIZE",
        str,
        "REPOFS_CACHE_SIZE",
        _cache_size,
        "Bound on the chunks cached on disk for an s3:// repository (default 8G).",
    ),
    (
        "--limit-upload",
        "KIB/S",
        float,
        "REPOFS_LIMIT_UPLOAD",
        _limit("upload"),
        "Upload at most this many KiB/s to an s3:// repository.",
    ),
    (
        "--limit-download",
        "KIB/S",
        float,
        "REPOFS_LIMIT_DOWNLOAD",
        _limit("download"),
        "Download at most this many KiB/s from an s3:// repository.",
    ),
)


def add_s3_options(group: click.Group) -> None:
    """Give every command of ``group`` that opens a repository the bucket options."""
    for command in group.commands.values():
        if isinstance(command, click.Group):
            add_s3_options(command)
            continue
        if command.name == "umount":
            continue
        taken = {opt for param in command.params for opt in param.opts}
        command.params += [
            click.Option(
                [flag if flag not in taken else f"--disk{flag[1:]}"],
                metavar=metavar,
                type=kind,
                envvar=env,
                expose_value=False,
                is_eager=True,
                callback=callback,
                help=text,
            )
            for flag, metavar, kind, env, callback, text in _OPTIONS
        ]  # mount's --cache-size is its memory cache: there the disk's is --disk-cache-size
