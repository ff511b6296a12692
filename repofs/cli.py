"""The ``repofs`` command line.

Every expected failure is a :class:`RepofsError` (or a click usage error)
and becomes one line ``repofs: error: ...`` with a non-zero exit status.
Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import click
import lmdb

from ingest.progress import human_bytes
from repofs import stopping
from repofs.config import DEFAULT_CHUNK, DEFAULT_COMPRESSION, parse_size, size_label
from repofs.errors import RepofsError, UsageError
from repofs.lock import lock_wait_option
from repofs.names import validate_vm_name
from repofs.repository import Repository


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
    """A deduplicated repository of image-level VM backups, mounted as flat VMDKs."""


@main.command()
@click.argument("repo")
@click.option(
    "--chunk-size",
    default=size_label(DEFAULT_CHUNK),
    show_default=True,
    help="Chunk size: a power of two from 4K to 4M.",
)
@click.option(
    "--compression", default=DEFAULT_COMPRESSION, show_default=True, help="zstd:LEVEL or none."
)
def init(repo: str, chunk_size: str, compression: str) -> None:
    """Create a new, empty repository in REPO."""
    size = parse_size(chunk_size, "--chunk-size")
    with Repository.init(repo, size, compression) as r:
        click.echo(
            f"created repository {repo} (id {r.config.repository_id}, "
            f"chunk size {human_bytes(size)}, {r.config.compression})"
        )


@main.command()
@click.argument("repo")
@click.argument("disks", nargs=-1, metavar="DISK=SOURCE...")
@click.option("--vm", "vm", required=True, help="VM name.")
@click.option(
    "--config",
    "configs",
    multiple=True,
    metavar="FILE",
    help="VM configuration file (.vmx, .ovf, libvirt XML) to keep with the restore point.",
)
@click.option("--format", "fmt", default=None, help="Source format (default: detect from content).")
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
@lock_wait_option()
def ingest(
    repo: str,
    disks: tuple[str, ...],
    vm: str,
    configs: tuple[str, ...],
    fmt: str | None,
    parent: str | None,
    changed: tuple[str, ...],
    cbt_check: int,
) -> None:
    """Ingest the disks of one VM as one new restore point; print its id last."""
    from ingest.job import run_ingest
    from repofs.malloc import keep_freed_memory

    keep_freed_memory()
    t0 = time.monotonic()
    rp = run_ingest(
        repo,
        vm,
        list(disks),
        list(configs),
        fmt=fmt,
        parent_spec=parent,
        changed_specs=list(changed),
        cbt_check=cbt_check,
    )
    elapsed = time.monotonic() - t0
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
@click.argument("repo")
@click.argument("vm", required=False)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def list_cmd(repo: str, vm: str | None, as_json: bool) -> None:
    """List VMs and their restore points."""
    with Repository.open(repo) as r:
        if vm is not None:
            validate_vm_name(vm)
        rps = r.restore_points(vm)
        if vm is not None and not rps:
            raise UsageError(f"unknown VM {vm!r}: it has no restore points")
    if as_json:
        out = [
            {
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
                    }
                    for d in p.disks
                ],
                "configs": [c.name for c in p.configs],
            }
            for p in rps
        ]
        click.echo(json.dumps(out, indent=2))
        return
    if not rps:
        click.echo("no restore points")
        return
    vm_width = max(16, *(len(p.vm) for p in rps))
    header = (
        f"{'VM':<{vm_width}} {'RESTORE POINT':<19} {'KIND':<11} {'DISKS':>5} {'CAPACITY':>10} "
        f"{'READ':>10} {'NEW':>10}  PARENT"
    )
    click.echo(header)
    for p in rps:
        click.echo(
            f"{p.vm:<{vm_width}} {p.id:<19} {p.kind:<11} {len(p.disks):>5} "
            f"{human_bytes(p.capacity):>10} {human_bytes(p.bytes_read):>10} "
            f"{human_bytes(p.bytes_new):>10}  {p.parent or '-'}"
        )


@main.command()
@click.argument("repo")
@click.argument("mountpoint")
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
def mount(
    repo: str,
    mountpoint: str,
    foreground: bool,
    allow_other: bool,
    cache_size: str,
    direct_io: bool,
    log_file: str | None,
    nonempty: bool,
) -> None:
    """Mount every restore point of REPO read-only at MOUNTPOINT."""
    from repofs.mount import mount as do_mount

    cache_bytes = parse_size(cache_size, "--cache-size")
    if cache_bytes < MIN_CACHE_BYTES:
        # 0 or a few bytes were taken: then not even the chunks of one 1 MiB request stay.
        raise UsageError(f"--cache-size must be at least {size_label(MIN_CACHE_BYTES)}")
    do_mount(
        repo,
        mountpoint,
        foreground=foreground,
        allow_other=allow_other,
        cache_bytes=cache_bytes,
        log_file=log_file,
        direct_io=direct_io,
        nonempty=nonempty,
    )


@main.command()
@click.argument("mountpoint")
def umount(mountpoint: str) -> None:
    """Unmount a repofs mount."""
    from repofs.mount import umount as do_umount

    do_umount(mountpoint)


@main.command()
@click.argument("repo")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def stats(repo: str, as_json: bool) -> None:
    """Space used and saved: logical bytes, unique stored bytes, dedup and compression ratios."""
    with Repository.open(repo) as r:
        s = r.stats()
    if as_json:
        click.echo(json.dumps(s, indent=2))
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


from repofs.cli_maintenance import register as _register_maintenance  # noqa: E402 - after main

_register_maintenance(main)
