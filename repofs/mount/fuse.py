"""A protocol adapter only: FUSE requests in, :class:`repofs.mount.vfs.RepoView` calls out.

Handlers run as trio tasks on one thread, so everything that touches LMDB
or a pack runs in a worker thread (``trio.to_thread``), bounded by one
capacity limiter.  Only ``FUSEError`` may leave a handler.  Restore point
contents are immutable, so their attributes get long kernel timeouts and
open files keep their page cache (unless the mount bypasses it,
``direct_io``).  Every name gets a short entry timeout, and so do the
attributes of directories that gain new restore points: a new restore point
appears within a second, and a pruned one is gone from ``stat`` as from
``ls`` within a second (a long entry timeout kept it answering for an hour).
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Callable
from typing import Any, TypeVar

import pyfuse3
import trio

from repofs.errors import IntegrityError
from repofs.mount.vfs import Attr, NotFound, RepoView

T = TypeVar("T")
log = logging.getLogger("repofs.mount.fuse")
IMMUTABLE_TIMEOUT = 3600.0
CHANGING_TIMEOUT = 1.0


class RepoFS(pyfuse3.Operations):
    def __init__(self, view: RepoView, threads: int = 8, direct_io: bool = False) -> None:
        super().__init__()
        self.view = view
        self._direct_io = direct_io
        self._limiter = trio.CapacityLimiter(threads)
        self._dirs: dict[int, list[tuple[bytes, Attr]]] = {}
        self._next_fh = 1
        self._uid = os.getuid()
        self._gid = os.getgid()

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        try:
            return await trio.to_thread.run_sync(fn, *args, limiter=self._limiter)
        except NotFound:
            raise pyfuse3.FUSEError(errno.ENOENT) from None
        except IntegrityError:
            raise pyfuse3.FUSEError(errno.EIO) from None
        except pyfuse3.FUSEError:
            raise
        except Exception:
            log.exception("internal error")
            raise pyfuse3.FUSEError(errno.EIO) from None

    def _entry(self, a: Attr) -> pyfuse3.EntryAttributes:
        e = pyfuse3.EntryAttributes()
        e.st_ino = a.ino
        e.generation = 0
        e.entry_timeout = CHANGING_TIMEOUT  # prune may remove any name but the root's
        e.attr_timeout = IMMUTABLE_TIMEOUT if a.immutable else CHANGING_TIMEOUT
        e.st_mode = a.mode
        e.st_nlink = a.nlink
        e.st_uid = self._uid
        e.st_gid = self._gid
        e.st_rdev = 0
        e.st_size = a.size
        e.st_blksize = 65536
        e.st_blocks = a.blocks
        ns = int(a.mtime * 1e9)
        e.st_atime_ns = e.st_mtime_ns = e.st_ctime_ns = ns
        return e

    # -- reading the tree --------------------------------------------------------------

    async def getattr(self, inode: int, ctx: Any = None) -> pyfuse3.EntryAttributes:
        return self._entry(await self._run(self.view.getattr, inode))

    async def lookup(
        self, parent_inode: int, name: bytes, ctx: Any = None
    ) -> pyfuse3.EntryAttributes:
        try:
            text = os.fsdecode(name)
        except UnicodeDecodeError:
            raise pyfuse3.FUSEError(errno.ENOENT) from None
        if text == ".":
            return await self.getattr(parent_inode)
        return self._entry(await self._run(self.view.lookup, parent_inode, text))

    async def readlink(self, inode: int, ctx: Any) -> bytes:
        return os.fsencode(await self._run(self.view.readlink, inode))

    def _dir_entries(self, inode: int) -> list[tuple[str, Attr]]:
        return self.view.dot_entries(inode) + self.view.listdir(inode)

    async def opendir(self, inode: int, ctx: Any) -> int:
        entries = await self._run(self._dir_entries, inode)
        fh = self._next_fh
        self._next_fh += 1
        self._dirs[fh] = [(os.fsencode(n), a) for n, a in entries]
        return fh

    async def readdir(self, fh: int, start_id: int, token: Any) -> None:
        entries = self._dirs.get(fh, [])
        for i in range(start_id, len(entries)):
            name, attr = entries[i]
            if not pyfuse3.readdir_reply(token, name, self._entry(attr), i + 1):
                break

    async def releasedir(self, fh: int) -> None:
        self._dirs.pop(fh, None)

    async def open(self, inode: int, flags: int, ctx: Any) -> pyfuse3.FileInfo:
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND | os.O_CREAT):
            raise pyfuse3.FUSEError(errno.EROFS)
        if not await self._run(self.view.is_file, inode):
            raise pyfuse3.FUSEError(errno.EISDIR)
        self.view.warm(inode)
        if self._direct_io:
            return pyfuse3.FileInfo(fh=inode, direct_io=True)
        return pyfuse3.FileInfo(fh=inode, keep_cache=True)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        data = self.view.read_cached(fh, off, size)  # memory only: never blocks the loop
        if data is not None:
            return data
        return await self._run(self.view.read, fh, off, size)

    async def release(self, fh: int) -> None:
        return None

    async def access(self, inode: int, mode: int, ctx: Any) -> bool:
        if mode & os.W_OK:
            raise pyfuse3.FUSEError(errno.EROFS)
        return True

    async def statfs(self, ctx: Any) -> pyfuse3.StatvfsData:
        st = os.statvfs(self.view.repo.path)
        out = pyfuse3.StatvfsData()
        out.f_bsize = st.f_bsize
        out.f_frsize = st.f_frsize
        out.f_blocks = st.f_blocks
        out.f_bfree = 0
        out.f_bavail = 0
        out.f_files = st.f_files
        out.f_ffree = 0
        out.f_favail = 0
        out.f_namemax = 255
        return out

    # No extended attributes.  ENOSYS (not ENODATA) makes the kernel remember that and
    # answer EOPNOTSUPP itself from then on: `ls -l` asks for two or three xattrs per
    # entry, and each was a round trip here (1000 restore points: 3000 requests).
    async def getxattr(self, inode: int, name: bytes, ctx: Any) -> bytes:
        raise pyfuse3.FUSEError(errno.ENOSYS)

    async def listxattr(self, inode: int, ctx: Any) -> list[bytes]:
        raise pyfuse3.FUSEError(errno.ENOSYS)

    # -- everything that would change something: read-only --------------------------

    async def _erofs(self, *args: Any) -> Any:
        raise pyfuse3.FUSEError(errno.EROFS)

    setattr = mknod = mkdir = unlink = rmdir = symlink = rename = link = _erofs
    create = write = setxattr = removexattr = fallocate = _erofs
