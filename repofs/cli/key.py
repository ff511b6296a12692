"""The key commands (``repofs key export|import|change-passphrase``) and the key source options.

Every command that opens a repository takes ``--passphrase-file FILE`` and
``--key-file FILE`` (added by :func:`add_key_source_options`); they are
recorded in the environment (``REPOFS_PASSPHRASE_FILE``, ``REPOFS_KEY_FILE``)
so a forked mount daemon sees them too.  A passphrase itself is never an
option: a command line is visible to every user of the machine.
"""

from __future__ import annotations

import os
from typing import Any

import click

from repofs.cli.common import repo_from_env
from repofs.errors import RepositoryError, UsageError
from repofs.store import crypto
from repofs.store.config import RepoConfig
from repofs.store.durable import write_file_atomic


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


def _encrypted(repo: str) -> tuple[RepoConfig, crypto.EncryptionConfig]:
    config = RepoConfig.load(repo)
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
        path = os.path.join(repo, crypto.KEY_FILE)
        blob = crypto.read_small_file(path, "the repository key", RepositoryError)
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
    write_file_atomic(os.path.join(repo, crypto.KEY_FILE), blob)
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
    master = crypto.load_master(repo, enc, config.repository_id)
    new = crypto.passphrase(new=True)
    blob = crypto.wrap(master, new, config.repository_id)
    write_file_atomic(os.path.join(repo, crypto.KEY_FILE), blob)
    click.echo(f"changed the passphrase of {repo}")
