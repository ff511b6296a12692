"""The durability primitives, in one place so the order of a commit is visible.

A file becomes durable by: write to a temporary name in the target
directory, ``fsync`` the file, ``rename`` onto its final name, ``fsync`` the
directory.  A directory becomes durable by ``fsync`` of its parent after the
``mkdir`` (:func:`make_dirs`): POSIX promises a new directory entry, of a
file or a directory, only once the directory holding it is fsynced.
Nothing else in repofs writes a file that must survive a crash.

``tests/support/powerloss.py`` checks these promises by cutting the power, in a
model of that strict rule, at every durability point of each command.
"""

from __future__ import annotations

import contextlib
import errno
import os

from repofs.errors import NoSpaceError, RepofsError


def fsync_dir(path: str) -> None:
    """Make the entries of directory ``path`` (creations, renames, unlinks) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_dirs(path: str, mode: int = 0o700) -> None:
    """``os.makedirs`` that a power loss cannot undo: each directory's parent is fsynced.

    Also when ``path`` already existed: another process may have just made
    it and not synced its parent yet, and whatever the caller puts inside
    must not outlive the entry that leads to it.  A parent this user may
    write into but not open (mode 0733) cannot be fsynced; that one is
    left to the file system.  Raises ``OSError``.
    """
    path = os.path.abspath(path)
    parent = os.path.dirname(path)
    if parent != path and not os.path.isdir(parent):
        make_dirs(parent, mode)
    try:
        os.mkdir(path, mode)
    except FileExistsError:
        if not os.path.isdir(path):
            raise
    with contextlib.suppress(PermissionError):
        fsync_dir(parent)


def free_bytes(path: str, *, as_this_user: bool = False) -> int | None:
    """Bytes an ordinary writer may still use on the file system holding ``path``.

    ``as_this_user``: for this process, which as root may also write the
    blocks a file system keeps back for root (5 % of ext4).  None if unknown.
    """
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    if st.f_blocks == 0:  # no space accounting (ramfs, some FUSE file systems): unknown
        return None
    blocks = st.f_bfree if as_this_user and os.geteuid() == 0 else st.f_bavail
    return blocks * st.f_frsize


def os_error(exc: OSError, what: str) -> RepofsError:
    """Translate an OS error during a write into the error an administrator acts on."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return NoSpaceError(f"{what}: no space left on the repository's filesystem")
    return RepofsError(f"{what}: {exc.strerror or exc}")


def write_file_atomic(path: str, data: bytes, mode: int = 0o600) -> None:
    """Write ``data`` to ``path`` so that a crash leaves the old file or the new, never half."""
    directory = os.path.dirname(path) or "."
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        fsync_dir(directory)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise os_error(exc, path) from None
