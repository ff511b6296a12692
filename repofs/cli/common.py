"""What every command shares: REPO from ``REPOFS_REPOSITORY``, ``--json`` and ``--progress``.

Kept apart from :mod:`repofs.cli.main` so that each command module (``main.py``,
``maintenance.py`` and those to come) can use it without importing the
command group.  The JSON documents themselves are described in
``docs/maintenance.md`` ("Machine-readable output"); each command builds
its own from its result object.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any, TypeVar

import click

from repofs.errors import UsageError
from repofs.store.config import CONFIG_FILE
from repofs.store.lock import set_lock_wait
from repofs.store.restorepoint import RestorePoint

F = TypeVar("F", bound=Callable[..., Any])

REPO_ENV = "REPOFS_REPOSITORY"


def missing_repository() -> UsageError:
    """The one error of a command that got neither REPO nor the variable."""
    return UsageError(f"no repository given: name REPO or set {REPO_ENV}")


def repo_from_env(value: str | None) -> str:
    """``value`` if given, else the repository the environment names, else a usage error.

    An explicit empty REPO stays empty, so that the repository code says
    the path is empty instead of silently using the variable.
    """
    if value is not None:
        return value
    env = os.environ.get(REPO_ENV)
    if not env:
        raise missing_repository()
    return env


def repo_vm_and_rest(args: tuple[str, ...], what: str) -> tuple[str, str, tuple[str, ...]]:
    """Split ``[REPO] VM ITEM...`` of a command whose last argument repeats.

    The count cannot tell whether REPO was left out, so the first argument
    is REPO unless ``REPOFS_REPOSITORY`` is set and it cannot be a
    repository path: a VM name holds no ``/`` and is no repository here.
    Any directory would not do: run where each VM's disks lie in a
    directory of its name, ``protect web01 latest`` took ``web01`` for REPO.
    """
    first = args[0] if args else ""
    is_repo = (
        not os.environ.get(REPO_ENV)
        or "/" in first
        or os.path.isfile(os.path.join(first, CONFIG_FILE))
    )
    repo, rest = (first, args[1:]) if is_repo else (repo_from_env(None), args)
    if len(rest) < 2:
        raise UsageError(f"name the VM and at least one {what}")
    return repo, rest[0], rest[1:]


def _need_repo(_ctx: click.Context, _param: click.Parameter, value: str | None) -> str:
    if value is None:  # click already looked at the variable (an empty one counts as unset)
        raise missing_repository()
    return value


def repo_argument(f: F) -> F:
    """REPO as the first argument, optional when ``REPOFS_REPOSITORY`` names the repository.

    Only for commands whose REPO is their only positional argument (or is
    followed by optional ones only, like ``list REPO [VM]``, where a lone
    argument is always REPO); commands with further required positionals
    resolve REPO themselves with :func:`repo_from_env`.
    """
    return click.argument(
        "repo", envvar=REPO_ENV, required=False, metavar="REPO", callback=_need_repo
    )(f)


def lock_wait_option() -> Callable[[F], F]:
    """The ``--lock-wait SECONDS`` option of every command that takes the repository lock.

    It sets the process-wide bound (:func:`repofs.store.lock.set_lock_wait`)
    through a callback, so no command's signature changes.
    """

    def callback(_ctx: click.Context, _param: click.Parameter, value: float | None) -> None:
        set_lock_wait(value)

    return click.option(
        "--lock-wait",
        type=click.FloatRange(min=0),
        default=None,
        metavar="SECONDS",
        expose_value=False,
        callback=callback,
        help="Give up (exit 6, nothing changed) if the repository is still busy after "
        "SECONDS; the default waits as long as it takes.",
    )


def json_option(f: F) -> F:
    """``--json``: the command's result as one JSON document on stdout, and nothing else there."""
    return click.option(
        "--json",
        "as_json",
        is_flag=True,
        help="Print the result as one JSON document on stdout (errors stay on stderr).",
    )(f)


def progress_option(f: F) -> F:
    """``--progress/--no-progress``; None (neither given) means: when stderr is a terminal."""
    return click.option(
        "--progress/--no-progress",
        default=None,
        help="Draw the progress bar on stderr, or never (default: when stderr is a terminal).",
    )(f)


def emit_json(doc: Any) -> None:
    """Print ``doc`` as the command's one JSON document on stdout."""
    click.echo(json.dumps(doc, indent=2))


def restore_point_doc(p: RestorePoint) -> dict[str, Any]:
    """A restore point as ``list --json`` and ``ingest --json`` show it."""
    return {
        "vm": p.vm,
        "id": p.id,
        "created": p.created,
        "kind": p.kind,
        "parent": p.parent,
        "capacity": p.capacity,
        "bytes_read": p.bytes_read,
        "bytes_new": p.bytes_new,
        "disks": [
            {
                "name": d.name,
                "capacity": d.capacity,
                "format": d.source_format,
                "read_mode": d.read_mode,
                "bytes_read": d.bytes_read,
                "bytes_new": d.bytes_new,
                "allocated": d.allocated_bytes,
                "cbt_position": d.cbt_position,
            }
            for d in p.disks
        ],
        "configs": [c.name for c in p.configs],
        "consistency": p.consistency,
        "note": p.note,
        "protected": p.protected,
    }
