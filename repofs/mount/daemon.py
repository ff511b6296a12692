"""Starting and stopping the FUSE daemon.

``repofs mount`` forks before anything opens LMDB (an LMDB environment must
not cross a ``fork``), and the parent returns only once the child reports
that the kernel mount exists, or with the child's one-line error.  If the
daemon dies, the mount is left in place: readers then get ENOTCONN instead
of an empty directory that a mirror or tape job would take as "everything
was deleted".
"""

from __future__ import annotations

import errno
import fcntl
import logging
import logging.handlers
import os
import re
import shutil
import signal
import subprocess
import sys
from typing import NamedTuple, TextIO

import pyfuse3
import trio

from repofs.errors import MountError, RepofsError, UsageError
from repofs.mount.fuse import RepoFS
from repofs.mount.refresh import DEFAULT_REFRESH, Refresher
from repofs.mount.vfs import RepoView
from repofs.store.config import RepoConfig
from repofs.store.location import is_s3
from repofs.store.opening import open_repository
from repofs.store.repository import INDEX_DIR, open_keys
from repofs.util.malloc import keep_freed_memory

log = logging.getLogger("repofs.mount.daemon")


REPOFS_FSTYPE = "fuse.repofs"  # "fuse." + the subtype the daemon mounts with
MOUNTINFO = "/proc/self/mountinfo"


class MountEntry(NamedTuple):
    device: str  # major:minor
    fstype: str
    owner: int | None  # a FUSE mount's user_id=, the user who may unmount it


def is_mountpoint(path: str) -> bool:
    try:
        return top_mount(os.path.realpath(path)) is not None
    except OSError:
        return os.path.ismount(path)


def top_mount(resolved_path: str) -> MountEntry | None:
    """The mount that ``resolved_path`` (already realpath'd) shows now, from mountinfo alone.

    Never a ``stat``: a dead FUSE mount fails it, and our own mount cannot
    answer before the daemon serves it.  Of several mounts stacked on one
    point, the visible one is the mount no other mount there sits on.
    """
    target = os.fsencode(resolved_path)
    entries: list[tuple[bytes, bytes, MountEntry]] = []
    with open(MOUNTINFO, "rb") as f:
        for line in f:
            fields = line.split()
            if len(fields) < 10 or b"-" not in fields[6:] or _unescape(fields[4]) != target:
                continue
            separator = fields.index(b"-", 6)
            fstype = _unescape(fields[separator + 1]).decode(errors="replace")
            entry = MountEntry(fields[2].decode(), fstype, _fuse_owner(fields[separator + 3 :]))
            entries.append((fields[0], fields[1], entry))
    parents = {parent for _id, parent, _entry in entries}
    on_top = [entry for mount_id, _parent, entry in entries if mount_id not in parents]
    return on_top[-1] if on_top else None


def _mount_device(resolved_path: str) -> str | None:
    """``major:minor`` of the file system mounted at ``resolved_path`` (already realpath'd)."""
    entry = top_mount(resolved_path)
    return entry.device if entry else None


def _fuse_owner(super_options: list[bytes]) -> int | None:
    for option in b",".join(super_options).split(b","):
        if option.startswith(b"user_id="):
            try:
                return int(option[len(b"user_id=") :])
            except ValueError:
                return None
    return None


def _unescape(field: bytes) -> bytes:
    """Undo the kernel's octal escapes in mountinfo (space, tab, newline, backslash)."""
    return re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m.group(1), 8)]), field)


def is_dead_mount(path: str) -> bool:
    """A FUSE mount whose daemon is gone: the kernel fails every call there until it is unmounted.

    With ENOTCONN, or ECONNABORTED while the daemon's exit is still being
    torn down.  ``statvfs``, because the kernel answers ``stat`` of the mount's
    root from its attribute cache without asking the daemon.
    """
    try:
        os.statvfs(path)
    except OSError as exc:
        return exc.errno in (errno.ENOTCONN, errno.ECONNABORTED)
    return False


def check_mountpoint(mountpoint: str) -> None:
    if not mountpoint:
        raise UsageError("the mount point path is empty")
    # Before lexists: a dead mount's lstat fails, and lexists would call it missing.
    if is_mountpoint(mountpoint):
        if is_dead_mount(mountpoint):
            raise MountError(
                f"{mountpoint}: the daemon of the mount there has died; "
                f"run 'repofs umount {mountpoint}' first"
            )
        raise MountError(f"{mountpoint}: something is already mounted there")
    if not os.path.lexists(mountpoint):
        raise MountError(f"{mountpoint}: mount point does not exist")
    if not os.path.isdir(mountpoint):
        raise MountError(f"{mountpoint}: mount point is not a directory")


def check_empty(mountpoint: str) -> None:
    """Refuse a mount point with files in it, as FUSE 2 did (fuse3 dropped the check).

    The mount hides them for as long as it is up: a directory of another
    repository (its ``packs/``) then looked damaged to verify, and what a
    job writes there meanwhile lands in nobody's view.
    """
    try:
        with os.scandir(mountpoint) as entries:
            occupied = next(entries, None) is not None
    except OSError as exc:
        raise MountError(f"{mountpoint}: cannot read the mount point: {exc.strerror}") from None
    if occupied:
        raise MountError(
            f"{mountpoint}: the mount point is not empty (the mount would hide its files); "
            "give --nonempty to mount over them anyway"
        )


def is_within(path: str, directory: str) -> bool:
    """Whether ``path`` is ``directory`` or lies under it (both already realpath'd)."""
    return os.path.commonpath([path, directory]) == directory


def check_apart(repo_path: str, mountpoint: str) -> None:
    """Refuse a mount point in the repository or above it.

    Inside, the mount covers the repository's own files, and the daemon,
    gc and ingest then reach them through the mount itself; above, it hides
    the repository from every other command ("no such repository").
    """
    repo = os.path.realpath(repo_path)
    target = os.path.realpath(mountpoint)
    if target == repo:
        raise MountError(f"{mountpoint}: the mount point is the repository itself")
    if is_within(target, repo):
        raise MountError(f"{mountpoint}: the mount point is inside the repository {repo_path}")
    if is_within(repo, target):
        raise MountError(f"{mountpoint}: the mount would hide the repository {repo_path} under it")


FUSE_DEVICE = "/dev/fuse"
FUSE_CONF = "/etc/fuse.conf"


def check_fuse_access(allow_other: bool) -> None:
    """Say why the kernel mount would fail, before libfuse tries it.

    libfuse explains a refused mount only on the daemon's stderr, which is
    closed by then, so the user would read just "fuse_session_mount
    failed".  The usual causes are a user who may not open the device (it
    is mode 0666 on most systems, 0600 in some containers), no
    ``fusermount3`` for a user who is not root, and ``allow_other``
    without ``user_allow_other``.
    """
    if not os.path.exists(FUSE_DEVICE):
        raise MountError(f"{FUSE_DEVICE} is missing: load the fuse module or install fuse3")
    if not os.access(FUSE_DEVICE, os.R_OK | os.W_OK):
        raise MountError(
            f"{FUSE_DEVICE}: permission denied: this user may not mount FUSE file systems"
        )
    if os.geteuid() == 0:
        return
    if shutil.which("fusermount3") is None:
        raise MountError(
            "fusermount3 is missing: install fuse3 (users other than root mount through it)"
        )
    if allow_other and not _fuse_conf_allows_other():
        raise MountError(
            f"--allow-other: only root may use it unless {FUSE_CONF} says user_allow_other"
        )


def _fuse_conf_allows_other() -> bool:
    try:
        with open(FUSE_CONF) as f:
            return any(line.split("#", 1)[0].strip() == "user_allow_other" for line in f)
    except OSError:
        return False


def open_log(log_file: str, repo_path: str) -> TextIO:
    """Open ``--log`` in the parent, where a bad path is a one-line error naming the file.

    Opened in the daemon, it failed as "daemon failed: [Errno 2] ...".
    Never inside the repository: appended log lines would corrupt its files
    (``--log REPO/config.json``).  The daemon inherits the open file.
    """
    if is_within(os.path.realpath(log_file), os.path.realpath(repo_path)):
        raise MountError(f"{log_file}: the log file may not be inside the repository")
    try:
        fd = os.open(log_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o666)
        # "a" seeks to the end: files of /proc and /sys refuse that (EINVAL)
        return open(_above_stdio(fd), "a", encoding="utf-8", errors="backslashreplace")
    except OSError as exc:
        raise MountError(f"{log_file}: cannot open the log file: {exc.strerror}") from None


def _above_stdio(fd: int) -> int:
    """``fd``, or a copy of it above 2 in its place: the daemon points 0-2 at /dev/null.

    Started with stdin or stdout closed (cron, some supervisors), repofs
    gets one of those numbers for a new descriptor: the start-up pipe was
    then overwritten and the parent waited for ever on a running daemon.
    """
    if fd > 2:
        return fd
    moved = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3)
    os.close(fd)
    return moved


def _setup_logging(log_stream: TextIO | None, foreground: bool) -> None:
    root = logging.getLogger("repofs")
    root.setLevel(logging.INFO)
    if log_stream:
        handler: logging.Handler = logging.StreamHandler(log_stream)
    elif foreground:
        handler = logging.StreamHandler(sys.stderr)
    elif os.path.exists("/dev/log"):
        handler = logging.handlers.SysLogHandler(address="/dev/log")
    else:
        handler = logging.NullHandler()
    handler.setFormatter(logging.Formatter("repofs[%(process)d]: %(levelname)s %(message)s"))
    root.addHandler(handler)


def mount(
    repo_path: str,
    mountpoint: str,
    *,
    foreground: bool = False,
    allow_other: bool = False,
    cache_bytes: int = 256 * 1024 * 1024,
    log_file: str | None = None,
    direct_io: bool = False,
    nonempty: bool = False,
    refresh: float = DEFAULT_REFRESH,
) -> None:
    # A clear error now, before forking; an encrypted repository is unlocked here, while
    # there is a terminal to ask on, and the daemon inherits the keys.
    if is_s3(repo_path):
        # Unlocks the keys, fills this host's cache from the bucket, and fails with one
        # line for a wrong endpoint, credentials or bucket, all before the fork.
        open_repository(repo_path).close()
    else:
        open_keys(repo_path, RepoConfig.load(repo_path))
        if not os.path.exists(os.path.join(repo_path, INDEX_DIR, "data.mdb")):
            raise MountError(f"{repo_path}: the index is missing; run 'repofs rebuild-index'")
    check_mountpoint(mountpoint)
    if not is_s3(repo_path):
        check_apart(repo_path, mountpoint)
    if not nonempty:
        check_empty(mountpoint)
    check_fuse_access(allow_other)
    log_stream = open_log(log_file, repo_path) if log_file else None
    if foreground:
        _setup_logging(log_stream, True)
        _serve(repo_path, mountpoint, allow_other, cache_bytes, direct_io, [], refresh)
        return
    read_fd, write_fd = (_above_stdio(fd) for fd in os.pipe())  # see _above_stdio
    pid = os.fork()
    if pid == 0:  # the daemon
        os.close(read_fd)
        ready = [write_fd]
        code = 1
        try:
            os.setsid()
            null = os.open(os.devnull, os.O_RDWR)
            for fd in (0, 1, 2):
                os.dup2(null, fd)
            _setup_logging(log_stream, False)
            _serve(repo_path, mountpoint, allow_other, cache_bytes, direct_io, ready, refresh)
            code = 0
        except RepofsError as exc:
            _report(ready, f"error:{exc}")
        except BaseException as exc:  # the parent must hear something, whatever happened
            log.exception("daemon failed")
            _report(ready, f"error:daemon failed: {exc}")
        finally:
            os._exit(code)
    os.close(write_fd)
    if log_stream:
        log_stream.close()  # the daemon has its own copy
    with os.fdopen(read_fd, "rb") as pipe:
        answer = pipe.read().decode(errors="replace").strip()
    if answer == "ready":
        return
    if answer.startswith("error:"):
        raise MountError(answer[len("error:") :])
    os.waitpid(pid, 0)
    raise MountError("the mount daemon exited during start-up")


def _report(ready: list[int], message: str) -> None:
    """Send the one start-up message to the parent, at most once (the fd is then closed)."""
    if not ready:
        return
    fd = ready.pop()
    try:
        os.write(fd, message.encode() + b"\n")
        os.close(fd)
    except OSError:
        pass


def _serve(
    repo_path: str,
    mountpoint: str,
    allow_other: bool,
    cache_bytes: int,
    direct_io: bool,
    ready: list[int],
    refresh: float = DEFAULT_REFRESH,
) -> None:
    resolved = os.path.realpath(mountpoint)  # before mounting: afterwards only we could answer
    keep_freed_memory(DAEMON_TRIM_THRESHOLD)
    repo = open_repository(repo_path)
    view = RepoView(repo, cache_bytes)
    view.prefetcher.submit(repo.index.warm, MOUNT_INDEX_WARM_BYTES)
    # Other hosts' commits and prunes reach a bucket's mount only through a sync.
    refresher = Refresher(repo, refresh).start() if is_s3(repo_path) and refresh > 0 else None
    ops = RepoFS(view, direct_io=direct_io)
    options = set(pyfuse3.default_options)
    options.discard("default_permissions")
    options |= {
        fsname_option(repo_path),
        "subtype=repofs",
        "ro",
        "default_permissions",
        "noatime",
    }
    if allow_other:
        options.add("allow_other")
    try:
        pyfuse3.init(ops, mountpoint, options)
    except RuntimeError as exc:
        raise MountError(f"{mountpoint}: cannot mount: {exc}") from None
    log.info("mounted %s on %s", repo_path, mountpoint)
    try:
        trio.run(_main, resolved, ready)
    except BaseException:
        log.exception("daemon crashed; leaving the mount point to answer ENOTCONN")
        pyfuse3.close(unmount=False)
        raise
    pyfuse3.close(unmount=True)
    if refresher is not None:
        refresher.stop()
    view.close()
    repo.close()
    log.info("unmounted %s", mountpoint)


def fsname_option(repo_path: str) -> str:
    """The ``fsname`` mount option, escaped so that it stays one option naming the exact path.

    libfuse's option parser splits at commas, so a repository called
    ``r,allow_other`` injected ``allow_other``; and pyfuse3 encodes options
    as ASCII, so ``rü`` killed the daemon.  The parser turns ``\\ooo`` back
    into that byte: every byte but printable ASCII other than ``,`` and
    ``\\`` goes octal, and the kernel records the path itself as the source.
    """
    raw = os.fsencode("repofs:" + os.path.abspath(repo_path))
    safe = (chr(b) if 0x20 <= b < 0x7F and b not in b",\\" else f"\\{b:03o}" for b in raw)
    return "fsname=" + "".join(safe)


READAHEAD_KB = 1024
DAEMON_TRIM_THRESHOLD = 64 * 1024 * 1024  # freed memory kept: part of the RSS bound
MOUNT_INDEX_WARM_BYTES = 512 * 1024 * 1024  # read a smaller index whole (see Index.warm)


def _tune_readahead(resolved_mountpoint: str) -> None:
    """Raise the kernel's readahead for this mount from 128 KiB to 1 MiB.

    The kernel sets the readahead when it processes the answer to FUSE_INIT,
    to the smaller of its value and the one libfuse asks for (128 KiB), so
    this must run after the INIT exchange, never straight after mounting.
    With it, the kernel sends 1 MiB read requests (libfuse negotiates
    max_pages 256) and keeps several in flight: measured in
    docs/performance.md, 1 MiB more than doubles sequential throughput and
    4 MiB gains nothing more.  Only root may write it; others keep the default.
    """
    device = _mount_device(resolved_mountpoint)  # never stat our own mount: nobody serves it yet
    if device is None:
        return
    path = f"/sys/class/bdi/{device}/read_ahead_kb"
    try:
        with open(path, "w") as f:
            f.write(str(READAHEAD_KB))
    except OSError as exc:
        log.info("cannot raise readahead (%s): %s", path, exc.strerror)


async def _main(resolved_mountpoint: str, ready: list[int]) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_stop_on_signal)
        nursery.start_soon(_when_answering, resolved_mountpoint, ready)
        await pyfuse3.main()
        nursery.cancel_scope.cancel()


async def _when_answering(resolved_mountpoint: str, ready: list[int]) -> None:
    """Once the kernel has finished FUSE_INIT: tune the readahead, then report "ready".

    A ``stat`` of the mount point from a worker thread returns only after
    the INIT exchange, served by :func:`pyfuse3.main` on this thread.  The
    parent therefore returns only when the mount answers, with its final
    readahead already in place.
    """
    try:
        await trio.to_thread.run_sync(os.stat, resolved_mountpoint)
        _tune_readahead(resolved_mountpoint)
    finally:
        _report(ready, "ready")


async def _stop_on_signal() -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for _sig in signals:
            pyfuse3.terminate()
            return


def umount(mountpoint: str) -> None:
    """Unmount a repofs mount, also one whose daemon died (its mount point cannot even be stat'ed).

    Only a repofs mount: run by root, ``fusermount3 -u`` unmounts whatever
    is there (a tmpfs with data in it, /proc).  The type comes from
    mountinfo, which still lists a dead mount.  fusermount3 gets the
    resolved path: it refuses a symlink to the mount point.
    """
    if not mountpoint:
        raise UsageError("the mount point path is empty")
    resolved = os.path.realpath(mountpoint)
    try:
        entry = top_mount(resolved)
    except OSError as exc:
        raise MountError(
            f"{mountpoint}: cannot tell what is mounted there ({MOUNTINFO}: {exc.strerror})"
        ) from None
    if entry is None:
        if not os.path.lexists(mountpoint):
            raise MountError(f"{mountpoint}: no such file or directory")
        raise MountError(f"{mountpoint}: is not mounted")
    if entry.fstype != REPOFS_FSTYPE:
        raise MountError(f"{mountpoint}: is not a repofs mount")
    if os.geteuid() != 0 and entry.owner is not None and entry.owner != os.geteuid():
        raise MountError(
            f"{mountpoint}: mounted by another user (uid {entry.owner}); "
            "only that user or root can unmount it"
        )
    tool = shutil.which("fusermount3") or shutil.which("fusermount")
    if tool is None:
        raise MountError("fusermount3 not found: install fuse3")
    proc = subprocess.run([tool, "-u", resolved], capture_output=True, text=True)
    if proc.returncode != 0:
        msg = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"
        raise MountError(f"{mountpoint}: cannot unmount: {msg}")
