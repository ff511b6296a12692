"""The repository's emergency space: a preallocated file that prune and gc give up on a full disk.

Freeing space needs a little space first: prune writes tombstones and gc
commits an LMDB transaction (copy-on-write pages) before it may delete a
single pack.  On a file system without a free byte both failed, and the
administrator had to find something else to delete.  ``init`` therefore
sets aside a small preallocated file.  When prune or gc runs out of space
they delete it and try once more; gc sets it aside again when it has
freed enough.  Ingest never writes data into the space, so a full disk
always leaves the way out open; only an ingest whose final commit failed
for lack of space gives it up, to tombstone its record (a way out too: a
rebuild-index would otherwise revive a restore point whose ingest failed).
(borg makes the administrator do this by hand with ``borg repo-space``.)
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from typing import TypeVar

from repofs.errors import NoSpaceError
from repofs.store.durable import free_bytes, fsync_dir

T = TypeVar("T")

RESERVE_FILE = "reserve"
MIN_BYTES = 1024 * 1024
MAX_BYTES = 64 * 1024 * 1024
STEP = 64 * 1024


def reserve_size(repo_path: str) -> int:
    """Half the index, from 1 to 64 MiB, and at most 1 % of the file system.

    What gc's sweep needs is new copy-on-write pages for the index entries
    it drops, so the need grows with the index; a fixed size would either
    waste space in small repositories or fall short in large ones.
    """
    try:
        st = os.statvfs(repo_path)
        # repository.INDEX_DIR, spelled out: repository imports this module
        index_st = os.stat(os.path.join(repo_path, "index", "data.mdb"))
        index = min(index_st.st_size, index_st.st_blocks * 512)  # not its sparse padding
    except OSError:
        return 0
    want = max(MIN_BYTES, min(MAX_BYTES, index // 2))
    return min(want, st.f_blocks * st.f_frsize // 100) // STEP * STEP


def set_aside(repo_path: str) -> int:
    """Create (or grow) the reserve if twice its size is free; returns its size, or 0; never raises.

    Written under a temporary name and renamed over the old one, so a crash
    never leaves a short reserve that looks complete.
    """
    path = os.path.join(repo_path, RESERVE_FILE)
    with contextlib.suppress(OSError):  # left by a crash; only init and gc (one at a time) write
        for name in os.listdir(repo_path):
            if name.startswith(f"{RESERVE_FILE}.tmp."):
                os.unlink(os.path.join(repo_path, name))
    size = reserve_size(repo_path)
    with contextlib.suppress(OSError):
        if os.stat(path).st_size >= size // 2:  # grown with the index only when far behind
            return 0
    if size == 0:
        return 0
    free = free_bytes(repo_path)
    if free is None or free < 2 * size:
        return 0
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.posix_fallocate(fd, 0, size)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, path)
        fsync_dir(repo_path)
        return size
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        return 0


def give_up(repo_path: str) -> int:
    """Delete the reserve (durably); returns the bytes it held, 0 if there was none."""
    path = os.path.join(repo_path, RESERVE_FILE)
    try:
        size = os.stat(path).st_size
        os.unlink(path)
    except OSError:
        return 0
    with contextlib.suppress(OSError):
        fsync_dir(repo_path)
    return size


def gave_up_warning(held: int, action: str) -> str:
    """The one warning of a command that gave up ``held`` bytes of the reserve to ``action``."""
    return (
        f"the file system was full: gave up the repository's reserve "
        f"({held / 2**20:.1f} MiB) to {action}"
    )


def retry_with_reserve(repo_path: str, attempt: Callable[[], T]) -> tuple[T, int]:
    """Run ``attempt``; if the disk is full, give up the reserve and run it once more.

    Returns its result and the bytes given up (0 if the first try did it).
    ``attempt`` must be safe to repeat after a failure part-way through.
    """
    try:
        return attempt(), 0
    except NoSpaceError:
        held = give_up(repo_path)
        if not held:
            raise
        return attempt(), held
