"""The ``repofs`` command line.

Every expected failure is a :class:`RepofsError` (or a click usage error)
and becomes one line ``repofs: error: ...`` with a non-zero exit status.
Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

import click
import lmdb

from repofs.cli.common import (
    REPO_ENV,
    emit_json,
    json_option,
    lock_wait_option,
    progress_option,
    repo_argument,
    repo_from_env,
    restore_point_doc,
)
from repofs.errors import RepofsError, UsageError
from repofs.store.config import (
    DEFAULT_CHUNK,
    DEFAULT_COMPRESSION,
    PACK_TARGET,
    parse_size,
    size_label,
)
from repofs.store.crypto import CIPHERS, DEFAULT_CIPHER
from repofs.store.names import validate_vm_name
from repofs.store.opening import init_repository, open_repository
from repofs.store.restorepoint import CONSISTENCY
from repofs.util import stopping
from repofs.util.progress import human_bytes


def _fail(message: str, code: int) -> None:
    one_line = " ".join(message.split())
    print(f"repofs: error: {one_line}", file=sys.stderr)
    sys.exit(code)


MIN_CACHE_BYTES = 1024 * 1024  # one FUSE request's worth; the default is 256M


def _fail_stopped(interrupt: BaseException | None) -> None:
    """The one line and exit status of a stop: 143 for SIGTERM, 130 for Ctrl-C."""
    if isinstance(interrupt, stopping.Terminated):
        _fail("terminated", 143)
    _fail("interrupted", 130)


class Stopped(Exception):
    """An interrupt carried past click, which would print a blank line for it first.

    The blank line ends a terminal's ``^C`` echo; in a log or a script's
    captured stderr it made the one-line error two lines.
    """

    def __init__(self, interrupt: KeyboardInterrupt) -> None:
        super().__init__()
        self.interrupt = interrupt


class RepofsGroup(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt as exc:
            raise Stopped(exc) from None

    def main(self, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        kwargs["standalone_mode"] = False
        stopping.install()
        try:
            rv = super().main(*args, **kwargs)
        except click.exceptions.NoArgsIsHelpError as exc:
            click.echo(exc.ctx.get_help() if exc.ctx else "", err=True)
            sys.exit(2)
        except click.exceptions.Exit as exc:
            sys.exit(exc.exit_code)
        except click.Abort as exc:  # click's wrapping of an interrupt outside a command
            _fail_stopped(exc.__cause__)
        except click.ClickException as exc:
            _fail(exc.format_message(), 2)
        except RepofsError as exc:
            _fail(str(exc), exc.exit_code)
        except Stopped as exc:
            if sys.stderr.isatty():
                print(file=sys.stderr)  # past the ^C echo or a progress bar
            _fail_stopped(exc.interrupt)
        except KeyboardInterrupt as exc:  # SIGTERM's Terminated included
            _fail_stopped(exc)
        except BrokenPipeError:
            sys.exit(141)
        except lmdb.Error as exc:  # damage LMDB finds only when a lookup walks into it
            _fail(f"the index is damaged ({exc}); run 'repofs rebuild-index'", 3)
        sys.exit(rv if isinstance(rv, int) else 0)


@click.group(cls=RepofsGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="repofs")
def main() -> None:
    """A deduplicated repository of image-level VM backups, mounted as flat VMDKs.

    REPO may be left out when the environment variable REPOFS_REPOSITORY names
    the repository.
    """


@main.command()
@repo_argument
@click.option(
    "--chunk-size",
    default=size_label(DEFAULT_CHUNK),
    show_default=True,
    help="Chunk size: a power of two from 4K to 4M.",
)
@click.option(
    "--compression", default=DEFAULT_COMPRESSION, show_default=True, help="zstd:LEVEL or none."
)
@click.option(
    "--encryption",
    type=click.Choice([*CIPHERS, "none"]),
    default=DEFAULT_CIPHER,
    show_default=True,
    help="AEAD sealing every record and name; the key comes from --key-file (created), "
    "--passphrase-file, REPOFS_PASSPHRASE or a prompt.",
)
@click.option(
    "--pack-size",
    default=size_label(PACK_TARGET),
    show_default=True,
    help="Target size of a pack (1M to 256M; 16M-128M suits object storage).",
)
@click.option(
    "--create-bucket",
    is_flag=True,
    help="For s3://BUCKET/PREFIX: create the bucket if it is missing (without it, a "
    "missing bucket is an error, so a typo does not make a new bucket).",
)
def init(
    repo: str,
    chunk_size: str,
    compression: str,
    encryption: str,
    pack_size: str,
    create_bucket: bool,
) -> None:
    """Create a new, empty repository in REPO, a directory or s3://BUCKET/PREFIX.

    Encrypted unless --encryption none.
    """
    size = parse_size(chunk_size, "--chunk-size")
    pack = parse_size(pack_size, "--pack-size")
    with init_repository(
        repo, size, compression, encryption, create_bucket=create_bucket, pack_size=pack
    ) as r:
        key = r.config.encryption
        sealed = ", not encrypted"
        if key is not None:
            where = "the key file" if key.key == "key-file" else "REPO/key"
            sealed = f", {key.cipher}, key in {where}"
        click.echo(
            f"created repository {repo} (id {r.config.repository_id}, "
            f"chunk size {human_bytes(size)}, {r.config.compression}{sealed})"
        )


@main.command()
@click.argument("repo", required=False, metavar="REPO")
@click.argument("disks", nargs=-1, metavar="DISK=SOURCE...")
@click.option("--vm", "vm", required=True, help="VM name.")
@click.option(
    "--config",
    "configs",
    multiple=True,
    metavar="FILE",
    help="VM configuration file (.vmx, .ovf, libvirt XML) to keep with the restore point.",
)
@click.option(
    "--format",
    "formats",
    multiple=True,
    metavar="[DISK=]FORMAT",
    help="Source format (raw, vmdk, qcow2, vhd, vhdx) of every disk or of DISK; default: "
    "block devices raw, files detected from their content.",
)
@click.option(
    "--backing-dir",
    "backing_dirs",
    multiple=True,
    metavar="DIR",
    help="Directory whose files a disk with a detected format may name as backing file, "
    "extent or parent (repeatable).",
)
@click.option(
    "--parent",
    default=None,
    metavar="RP|latest",
    help="Restore point to take unchanged blocks from (default: the VM's latest).",
)
@click.option(
    "--changed-blocks",
    "changed",
    multiple=True,
    metavar="DISK=CBT",
    help="Changed-block list for a disk: a JSON file or qemu-bitmap:NAME.",
)
@click.option(
    "--cbt-check",
    default=0,
    type=int,
    metavar="N",
    help="Compare N chunks the list calls unchanged with the parent; fail on a difference.",
)
@click.option(
    "--consistency",
    type=click.Choice(CONSISTENCY),
    default="crash",
    show_default=True,
    help="How the guest was quiesced before the snapshot: crash (not at all), filesystem "
    "(fs-freeze) or application (VSS, application hooks).",
)
@click.option("--note", default=None, metavar="TEXT", help="A note kept with the restore point.")
@click.option(
    "--cbt-position",
    "positions",
    multiple=True,
    metavar="DISK=ID",
    help="Record the disk's changed-block tracking position (VMware changeId, qemu bitmap).",
)
@click.option(
    "--cbt-base",
    "bases",
    multiple=True,
    metavar="DISK=ID",
    help="Position the disk's changed-block list starts at; must be the parent's.",
)
@progress_option
@json_option
@lock_wait_option()
def ingest(
    repo: str | None,
    disks: tuple[str, ...],
    vm: str,
    configs: tuple[str, ...],
    formats: tuple[str, ...],
    backing_dirs: tuple[str, ...],
    parent: str | None,
    changed: tuple[str, ...],
    cbt_check: int,
    consistency: str,
    note: str | None,
    positions: tuple[str, ...],
    bases: tuple[str, ...],
    progress: bool | None,
    as_json: bool,
) -> None:
    """Ingest the disks of one VM as one new restore point; print its id last.

    With REPOFS_REPOSITORY set, REPO may be left out: a first argument with
    an '=' that is not a directory is then the first DISK=SOURCE.
    """
    from ingest.job import run_ingest
    from repofs.util.malloc import keep_freed_memory

    if repo is not None and "=" in repo and not os.path.isdir(repo):
        disks = (repo, *disks)  # no REPO given: the variable names it
        repo = None
    repo = repo_from_env(repo)
    keep_freed_memory()
    t0 = time.monotonic()
    rp = run_ingest(
        repo,
        vm,
        list(disks),
        list(configs),
        formats=formats,
        backing_dirs=backing_dirs,
        parent_spec=parent,
        changed_specs=list(changed),
        cbt_check=cbt_check,
        consistency=consistency,
        note=note,
        position_specs=list(positions),
        base_specs=list(bases),
        progress=progress,
        on_detected=lambda disk, path, fmt: click.echo(
            f"{disk}: {path} is read as {fmt}: no --format given", err=True
        ),
    )
    elapsed = time.monotonic() - t0
    if as_json:
        emit_json({**restore_point_doc(rp), "seconds": elapsed})
        return
    for d in rp.disks:
        click.echo(
            f"{d.name}: {human_bytes(d.capacity)} {d.source_format}, {d.read_mode}: "
            f"read {human_bytes(d.bytes_read)}, stored {human_bytes(d.bytes_new)} new"
        )
    click.echo(
        f"restore point {rp.vm}/{rp.id} committed in {elapsed:.1f} s "
        f"({rp.bytes_read / max(elapsed, 1e-6) / 1e6:.0f} MB/s read)"
    )
    click.echo(rp.id)


@main.command(name="list")
@repo_argument
@click.argument("vm", required=False)
@json_option
def list_cmd(repo: str, vm: str | None, as_json: bool) -> None:
    """List VMs and their restore points."""
    with open_repository(repo) as r:
        if vm is not None:
            validate_vm_name(vm)
        rps = r.restore_points(vm)
        if vm is not None and not rps:
            raise UsageError(f"unknown VM {vm!r}: it has no restore points")
    if as_json:
        emit_json([restore_point_doc(p) for p in rps])
        return
    if not rps:
        click.echo("no restore points")
        return
    vm_width = max(16, *(len(p.vm) for p in rps))
    header = (
        f"{'VM':<{vm_width}} {'RESTORE POINT':<19} {'KIND':<11} {'DISKS':>5} {'CAPACITY':>10} "
        f"{'READ':>10} {'NEW':>10}  {'PARENT':<19} {'CONSISTENCY':<11} {'PROTECTED':<9}  NOTE"
    )
    click.echo(header.rstrip())
    for p in rps:
        line = (
            f"{p.vm:<{vm_width}} {p.id:<19} {p.kind:<11} {len(p.disks):>5} "
            f"{human_bytes(p.capacity):>10} {human_bytes(p.bytes_read):>10} "
            f"{human_bytes(p.bytes_new):>10}  {p.parent or '-':<19} {p.consistency:<11} "
            f"{'yes' if p.protected else '-':<9}  {p.note or ''}"
        )
        click.echo(line.rstrip())


@main.command()
@click.argument("repo", required=False, metavar="REPO")
@click.argument("mountpoint", required=False, metavar="MOUNTPOINT")
@click.option("--foreground", "-f", is_flag=True, help="Stay in the foreground.")
@click.option("--allow-other", is_flag=True, help="Let other users read the mount.")
@click.option("--cache-size", default="256M", show_default=True, help="Chunk cache size.")
@click.option(
    "--direct-io",
    is_flag=True,
    help="Bypass the kernel page cache: faster sweeps in large blocks (tape, dd bs=1M), "
    "slower small reads (tar's default 10 KiB).",
)
@click.option("--log", "log_file", default=None, metavar="FILE", help="Daemon log file.")
@click.option(
    "--nonempty", is_flag=True, help="Mount over a directory that has files (hiding them)."
)
@click.option(
    "--refresh",
    type=float,
    default=30.0,
    show_default=True,
    metavar="SECONDS",
    help="For an s3:// repository: look for other hosts' new (and pruned) restore points "
    "this often; 0: never.",
)
def mount(
    repo: str | None,
    mountpoint: str | None,
    foreground: bool,
    allow_other: bool,
    cache_size: str,
    direct_io: bool,
    log_file: str | None,
    nonempty: bool,
    refresh: float,
) -> None:
    """Mount every restore point of REPO read-only at MOUNTPOINT.

    With REPOFS_REPOSITORY set, REPO may be left out: a lone argument is MOUNTPOINT.
    """
    from repofs.mount.daemon import mount as do_mount

    if mountpoint is None:
        if repo is None or not os.environ.get(REPO_ENV):
            raise click.UsageError("Missing argument 'MOUNTPOINT'.")
        repo, mountpoint = repo_from_env(None), repo
    assert repo is not None

    cache_bytes = parse_size(cache_size, "--cache-size")
    if cache_bytes < MIN_CACHE_BYTES:
        # 0 or a few bytes were taken: then not even the chunks of one 1 MiB request stay.
        raise UsageError(f"--cache-size must be at least {size_label(MIN_CACHE_BYTES)}")
    if not refresh >= 0 or refresh == float("inf"):
        raise UsageError("--refresh must be a number of seconds, 0 or more")
    do_mount(
        repo,
        mountpoint,
        foreground=foreground,
        allow_other=allow_other,
        cache_bytes=cache_bytes,
        log_file=log_file,
        direct_io=direct_io,
        nonempty=nonempty,
        refresh=refresh,
    )


@main.command()
@click.argument("mountpoint")
def umount(mountpoint: str) -> None:
    """Unmount a repofs mount."""
    from repofs.mount.daemon import umount as do_umount

    do_umount(mountpoint)


@main.command()
@repo_argument
@json_option
def stats(repo: str, as_json: bool) -> None:
    """Space used and saved: logical bytes, unique stored bytes, dedup and compression ratios."""
    with open_repository(repo) as r:
        s = r.stats()
    if as_json:
        emit_json(s)
        return
    rows = [
        ("VMs", str(s["vms"])),
        ("restore points", str(s["restore_points"])),
        ("logical bytes", human_bytes(s["logical_bytes"])),
        ("allocated bytes", human_bytes(s["allocated_bytes"])),
        ("unique bytes", human_bytes(s["unique_bytes"])),
        ("stored chunk bytes", human_bytes(s["stored_chunk_bytes"])),
        ("metadata bytes", human_bytes(s["metadata_bytes"])),
        ("dedup ratio", f"{s['dedup_ratio']:.2f}"),
        ("compression ratio", f"{s['compression_ratio']:.2f}"),
        ("chunks", str(s["chunk_count"])),
        ("map pages", str(s["page_count"])),
        ("packs", f"{s['pack_count']} ({human_bytes(s['pack_bytes'])})"),
    ]
    for k, v in rows:
        click.echo(f"{k:<20} {v}")


from repofs.cli.maintenance import register as _register_maintenance  # noqa: E402 - after main

_register_maintenance(main)

from repofs.cli.key import add_key_source_options, key  # noqa: E402 - after main
from repofs.cli.s3options import add_s3_options  # noqa: E402 - after main

main.add_command(key)
add_key_source_options(main)  # last: every command has them
add_s3_options(main)
