"""The key commands (``repofs key export|import|change-passphrase``) and the key source options.

Every command that opens a repository takes ``--passphrase-file FILE`` and
``--key-file FILE`` (added by :func:`add_key_source_options`); they are
recorded in the environment (``REPOFS_PASSPHRASE_FILE``, ``REPOFS_KEY_FILE``)
so a forked mount daemon sees them too.  A passphrase itself is never an
option: a command line is visible to every user of the machine.

On ``s3://BUCKET/PREFIX`` the config and the wrapped key are the objects
``config.json`` and ``key``: the key commands read and write those instead
of files.  change-passphrase and import replace the ``key`` object with one
PUT, which S3 makes atomic (a reader gets the old object or the new one,
whole), so no moment exists without a key; the old wrapped key is not
kept in the bucket, since the point of a new passphrase is that the old
one opens nothing there any more (copies made with ``key export`` still
open with it).
"""

from __future__ import annotations

import os
from typing import Any

import click

from repofs.cli.common import repo_from_env
from repofs.errors import RepositoryError, UsageError
from repofs.store import crypto
from repofs.store.config import CONFIG_FILE, RepoConfig
from repofs.store.durable import write_file_atomic
from repofs.store.location import is_s3


def _set_passphrase_file(_ctx: click.Context, _param: click.Parameter, value: Any) -> None:
    if value is not None:
        crypto.set_sources(passphrase_file=value)


def _set_key_file(_ctx: click.Context, _param: click.Parameter, value: Any) -> None:
    if value is not None:
        crypto.set_sources(key_file=value)


#: The options that name where the key comes from, added to every command that opens a repository.
_KEY_SOURCE_OPTIONS = (
    (
        "--passphrase-file",
        _set_passphrase_file,
        "Read the passphrase from FILE (or set REPOFS_PASSPHRASE).",
    ),
    (
        "--key-file",
        _set_key_file,
        "The key file of a repository encrypted with one (init creates it).",
    ),
)


def add_key_source_options(group: click.Group) -> None:
    """Give every command of ``group`` (and of its subgroups) the two key source options."""
    for command in group.commands.values():
        if isinstance(command, click.Group):
            add_key_source_options(command)
            continue
        if command.name == "umount":
            continue
        command.params += [
            click.Option(
                [flag],
                metavar="FILE",
                expose_value=False,
                is_eager=True,
                callback=callback,
                help=text,
            )
            for flag, callback, text in _KEY_SOURCE_OPTIONS
        ]


def _repo_and_file(args: tuple[str, ...]) -> tuple[str, str]:
    if len(args) == 2:
        return args[0], args[1]
    if len(args) == 1:
        return repo_from_env(None), args[0]
    raise UsageError("expected [REPO] FILE")


def _bucket(repo: str) -> Any:
    from repofs.store.bucket import Bucket
    from repofs.store.location import parse_s3

    return Bucket(parse_s3(repo))


def _load_config(repo: str) -> RepoConfig:
    if not is_s3(repo):
        return RepoConfig.load(repo)
    from repofs.store.bucket import ObjectMissing

    bucket = _bucket(repo)
    try:
        raw = bucket.get(CONFIG_FILE)
    except ObjectMissing:
        bucket.check()
        raise RepositoryError(f"{repo}: not a repofs repository (no {CONFIG_FILE})") from None
    return RepoConfig.parse(raw, f"{repo}/{CONFIG_FILE}")


def _read_key(repo: str) -> bytes:
    """The wrapped master key: REPO/key, or the bucket's ``key`` object."""
    if not is_s3(repo):
        path = os.path.join(repo, crypto.KEY_FILE)
        return crypto.read_small_file(path, "the repository key", RepositoryError)
    from repofs.store.bucket import ObjectMissing

    try:
        return bytes(_bucket(repo).get(crypto.KEY_FILE))
    except ObjectMissing:
        raise RepositoryError(
            f"{repo}/{crypto.KEY_FILE}: is missing; put an exported copy back with "
            "'repofs key import'"
        ) from None


def _write_key(repo: str, blob: bytes) -> None:
    """Replace the wrapped key at once: a renamed file, or one (atomic) PUT of the object."""
    if is_s3(repo):
        _bucket(repo).put(crypto.KEY_FILE, blob)
    else:
        write_file_atomic(os.path.join(repo, crypto.KEY_FILE), blob)


def _master(repo: str, config: RepoConfig, enc: crypto.EncryptionConfig) -> bytes:
    if enc.key == "key-file" or not is_s3(repo):
        return crypto.load_master(repo, enc, config.repository_id)
    where = f"{repo}/{crypto.KEY_FILE}"
    master = crypto.unwrap(_read_key(repo), crypto.passphrase(), config.repository_id, where)
    if crypto.key_id_of(master) != enc.key_id:
        raise UsageError(f"{where}: holds another key than this repository's")
    return master


def _encrypted(repo: str) -> tuple[RepoConfig, crypto.EncryptionConfig]:
    config = _load_config(repo)
    if config.encryption is None:
        raise UsageError(f"{repo}: is not encrypted (it was created with --encryption none)")
    return config, config.encryption


@click.group()
def key() -> None:
    """Export, import or re-wrap the key of an encrypted repository."""


@key.command(name="export")
@click.argument("args", nargs=-1, metavar="[REPO] FILE")
def export_cmd(args: tuple[str, ...]) -> None:
    """Write a copy of the repository's key to FILE (a new file, 0600).

    With a passphrase, the copy is REPO/key as it is: it still needs the
    passphrase, and 'key import' puts it back if REPO/key is lost.  With a
    key file, the copy is that key file (checked against the repository).
    """
    repo, target = _repo_and_file(args)
    config, enc = _encrypted(repo)
    if enc.key == "key-file":
        master = crypto.load_master(repo, enc, config.repository_id)
        blob = crypto.key_file_doc(master, enc, config.repository_id)
    else:
        blob = _read_key(repo)
    crypto.write_new_file(target, blob)
    click.echo(f"exported the key of {repo} to {target}")


@key.command(name="import")
@click.argument("args", nargs=-1, metavar="[REPO] FILE")
def import_cmd(args: tuple[str, ...]) -> None:
    """Put an exported key back as REPO/key, once the passphrase opens it and it is this key."""
    repo, source = _repo_and_file(args)
    config, enc = _encrypted(repo)
    if enc.key == "key-file":
        raise UsageError(
            f"{repo}: its key is the key file itself, kept outside the repository; "
            "nothing to import"
        )
    blob = crypto.read_small_file(source, "the exported key")
    master = crypto.unwrap(blob, crypto.passphrase(), config.repository_id, source)
    if crypto.key_id_of(master) != enc.key_id:
        raise UsageError(f"{source}: holds another key than this repository's")
    _write_key(repo, blob)
    click.echo(f"imported the key of {repo} from {source}")


@key.command(name="change-passphrase")
@click.argument("repo", required=False, metavar="REPO")
@click.option(
    "--new-passphrase-file",
    metavar="FILE",
    default=None,
    help="Read the new passphrase from FILE (or set REPOFS_NEW_PASSPHRASE).",
)
def change_passphrase(repo: str | None, new_passphrase_file: str | None) -> None:
    """Wrap the master key under a new passphrase (REPOFS_NEW_PASSPHRASE, or a prompt).

    The master key stays: no record is rewritten, and the old passphrase
    no longer opens the repository.  Copies exported before still need
    the old passphrase.
    """
    repo = repo_from_env(repo)
    if new_passphrase_file is not None:
        os.environ[crypto.NEW_PASSPHRASE_FILE_ENV] = os.path.abspath(new_passphrase_file)
    config, enc = _encrypted(repo)
    if enc.key == "key-file":
        raise UsageError(f"{repo}: has a key file, not a passphrase")
    master = _master(repo, config, enc)
    new = crypto.passphrase(new=True)
    blob = crypto.wrap(master, new, config.repository_id)
    _write_key(repo, blob)
    click.echo(f"changed the passphrase of {repo}")
