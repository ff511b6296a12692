"""The durability primitives, in one place so the order of a commit is visible.

A file becomes durable by: write to a temporary name in the target
directory, ``fsync`` the file, ``rename`` onto its final name, ``fsync`` the
directory.  Nothing else in repofs writes a file that must survive a crash.
"""

from __future__ import annotations

import contextlib
import errno
import os

from repofs.errors import NoSpaceError, RepofsError


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
