#!/usr/bin/env python3
"""The ceiling for any Python FUSE file system here: one file, read straight from an image.

``bench_passthrough.py IMAGE MOUNTPOINT`` mounts a read-only directory
holding ``disk.img``, whose reads are ``os.pread`` on IMAGE done in the
handler itself (no worker thread, no checks, no copies beyond pyfuse3's
own).  The kernel side is tuned exactly like repofs (1 MiB readahead set
after FUSE_INIT, page cache kept), so that the only difference left is
the work repofs does per request.  It prints ``ready`` on stdout once the
mount answers and serves until SIGTERM/SIGINT.
"""

from __future__ import annotations

import errno
import os
import signal
import stat
import sys

import pyfuse3
import trio

FILE_INODE = 2
NAME = b"disk.img"
READAHEAD_KB = 1024


class PassThrough(pyfuse3.Operations):
    def __init__(self, image: str) -> None:
        super().__init__()
        self.fd = os.open(image, os.O_RDONLY)
        self.size = os.fstat(self.fd).st_size

    def _attr(self, ino: int) -> pyfuse3.EntryAttributes:
        e = pyfuse3.EntryAttributes()
        e.st_ino = ino
        e.entry_timeout = e.attr_timeout = 3600
        if ino == pyfuse3.ROOT_INODE:
            e.st_mode, e.st_size, e.st_nlink = stat.S_IFDIR | 0o555, 0, 2
        else:
            e.st_mode, e.st_size, e.st_nlink = stat.S_IFREG | 0o444, self.size, 1
        e.st_blksize = 65536
        e.st_blocks = (self.size + 511) // 512
        return e

    async def getattr(self, inode, ctx=None):
        if inode not in (pyfuse3.ROOT_INODE, FILE_INODE):
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attr(inode)

    async def lookup(self, parent_inode, name, ctx=None):
        if parent_inode != pyfuse3.ROOT_INODE or name != NAME:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attr(FILE_INODE)

    async def opendir(self, inode, ctx):
        return inode

    async def readdir(self, fh, start_id, token):
        if start_id == 0:
            pyfuse3.readdir_reply(token, NAME, self._attr(FILE_INODE), 1)

    async def open(self, inode, flags, ctx):
        return pyfuse3.FileInfo(fh=inode, keep_cache=True)

    async def read(self, fh, off, size):
        return os.pread(self.fd, size, off)


def _bdi(mountpoint: str) -> str | None:
    dev = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if len(fields) > 4 and fields[4] == mountpoint:
                dev = fields[2]
    return dev


async def _main(mountpoint: str) -> None:
    async def tune() -> None:
        await trio.to_thread.run_sync(os.stat, mountpoint)
        dev = _bdi(mountpoint)
        if dev:
            with open(f"/sys/class/bdi/{dev}/read_ahead_kb", "w") as f:
                f.write(str(READAHEAD_KB))
        print("ready", flush=True)

    async def stop() -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for _ in signals:
                pyfuse3.terminate()
                return

    async with trio.open_nursery() as nursery:
        nursery.start_soon(tune)
        nursery.start_soon(stop)
        await pyfuse3.main()
        nursery.cancel_scope.cancel()


def main() -> int:
    image, mountpoint = sys.argv[1], os.path.realpath(sys.argv[2])
    ops = PassThrough(image)
    options = set(pyfuse3.default_options) | {"fsname=passthrough", "ro", "noatime"}
    pyfuse3.init(ops, mountpoint, options)
    try:
        trio.run(_main, mountpoint)
    finally:
        pyfuse3.close(unmount=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
