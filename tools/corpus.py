#!/usr/bin/env python3
"""Deterministic benchmark corpus of VM disk images for repofs.

The corpus is a set of sparse raw disk images (GPT, a small EFI-ish partition and a big
ext4 root partition) holding OS-like content copied and derived from this machine's /usr,
plus generated application data.  Each VM has a "day 0" image and one image per day of
server-like changes; for every day the changed-block list against the previous day is
written in repofs CBT JSON, computed by comparing the two images (ground truth at 64 KiB).

Why it is built the way it is:

* Changes are made by the real kernel ext4 driver (mounted through an offset loop
  device) so that blocks land where a real filesystem puts them.
* The kernel is not deterministic by itself (clock, random inode generations, per-CPU
  allocation groups, background writeback, journal commit timing), so the generator
  removes those sources: data is written with O_DIRECT from a process pinned to one CPU
  (block allocation happens synchronously in our context), the journal only commits at
  our explicit ``syncfs`` points, and after unmount a normalisation pass rewrites the
  clock-dependent fields (inode timestamps and generations, superblock mount/write
  times, last-mounted path, lifetime-writes counter) and resets the journal to its
  freshly formatted state.  See docs/corpus.md for what this costs in realism.

Usage: ``python3 tools/corpus.py --out DIR --seed N [--size 8G] [--data 2G] [--days 5]
[--vms 2] [--change-rate 0.01]``.  Needs root (loop devices, mount).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import dataclasses
import gzip
import hashlib
import json
import logging
import mmap
import os
import random
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import uuid
import zlib
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

GENERATOR_VERSION = 1
MANIFEST_FORMAT = "repofs-corpus/1"
CBT_BLOCK = 65536
SECTOR = 512
FS_BLOCK = 4096
MiB = 1 << 20
GiB = 1 << 30

# Fake clock.  Every timestamp in the images is derived from FAKE_EPOCH so that images do
# not depend on when they were generated.  Anything at or after REAL_TIME_THRESHOLD in an
# inode or superblock can only come from the kernel's real clock and gets normalised.
FAKE_EPOCH = 1_500_000_000  # 2017-07-14: "installation" of the template VM
DAY_SECONDS = 86_400
MAX_DAYS = 1000
REAL_TIME_THRESHOLD = FAKE_EPOCH + (MAX_DAYS + 30) * DAY_SECONDS
MKFS_TIME = FAKE_EPOCH - DAY_SECONDS

SOURCE_ROOTS_SYSTEM = ("/usr/bin", "/usr/sbin", "/usr/lib", "/usr/libexec")
SOURCE_ROOTS_SHARE = ("/usr/share",)
SOURCE_MAX_FILE = 64 * MiB

# Mount options chosen for determinism (see module docstring):
#  noatime            reads never write
#  commit=86400       the journal only commits when we call syncfs (or it fills up)
#  barrier=0          flushes would fsync the backing file on every syncfs: slow, useless
#  nodioread_nolock   no unwritten-extent conversion in background workers
#  mb_optimize_scan=0 linear group scan: independent of buddy-cache prefetch timing
#  noinit_itable      no ext4lazyinit thread writing zeros in the background; the inode
#                     tables of a fresh sparse image read as zeros anyway
MOUNT_OPTIONS = "noatime,commit=86400,barrier=0,nodioread_nolock,mb_optimize_scan=0,noinit_itable"

GPT_LINUX_FS = "0FC63DAF-8483-4772-8E79-3D69D8477DE4"
GPT_EFI = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"


log = logging.getLogger("corpus")


class CorpusError(RuntimeError):
    """Raised when the corpus cannot be generated (bad parameters, missing privileges)."""


# --------------------------------------------------------------------------------------
# Manifest
# --------------------------------------------------------------------------------------


@dataclasses.dataclass
class DayRecord:
    """One image of one VM: paths are relative to the corpus directory."""

    day: int
    image: str
    cbt: str | None
    allocated_bytes: int
    changed_bytes: int | None
    changed_blocks: int | None
    digest: str


@dataclasses.dataclass
class VmRecord:
    """A VM's chain of daily images; ``clone_of`` names the template it was cloned from."""

    name: str
    clone_of: str | None
    days: list[DayRecord]


@dataclasses.dataclass
class Manifest:
    """What was generated, with which parameters; also the cache key for re-runs."""

    params: dict[str, Any]
    source_fingerprint: str
    layout: dict[str, Any]
    vms: list[VmRecord]
    format: str = MANIFEST_FORMAT
    generator_version: int = GENERATOR_VERSION
    block_size: int = CBT_BLOCK
    complete: bool = True

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        raw = json.loads(text)
        vms = [
            VmRecord(
                name=v["name"],
                clone_of=v["clone_of"],
                days=[DayRecord(**d) for d in v["days"]],
            )
            for v in raw.pop("vms")
        ]
        return cls(vms=vms, **raw)


@dataclasses.dataclass(frozen=True)
class Params:
    """Generation parameters; everything that influences the bytes of the corpus."""

    seed: int
    size: int
    data_bytes: int
    days: int
    vms: int
    change_rate: float

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Layout:
    """Byte geometry of the disk: where the EFI-ish and the ext4 partitions live."""

    size: int
    efi_offset: int
    efi_size: int
    root_offset: int
    root_size: int

    def as_dict(self) -> dict[str, Any]:
        return {
            "sector_size": SECTOR,
            "virtual_size": self.size,
            "partition_table": "gpt",
            "partitions": [
                {"name": "EFI", "offset": self.efi_offset, "size": self.efi_size, "fs": None},
                {"name": "root", "offset": self.root_offset, "size": self.root_size,
                 "fs": "ext4"},
            ],
        }


# --------------------------------------------------------------------------------------
# Small utilities
# --------------------------------------------------------------------------------------


def parse_size(text: str) -> int:
    """Parse ``8G``/``256M``/``4096`` (binary units) into bytes."""
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    mult = 1
    for suffix, m in (("K", 1 << 10), ("M", MiB), ("G", GiB), ("T", 1 << 40)):
        if t.endswith(suffix):
            t, mult = t[:-1], m
            break
    try:
        value = float(t)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"bad size: {text!r}") from exc
    return int(value * mult)


def derive_rng(seed: int, *labels: object) -> random.Random:
    """Independent, reproducible PRNG stream per purpose (VM, day, ...).

    Separate streams keep one VM's choices from shifting when another part of the
    generator changes how many random numbers it draws.
    """
    key = ":".join([str(seed), *map(str, labels)]).encode()
    return random.Random(int.from_bytes(hashlib.sha256(key).digest(), "big"))


def seeded_uuid(seed: int, label: str) -> str:
    return str(uuid.UUID(bytes=hashlib.sha256(f"{seed}:{label}".encode()).digest()[:16]))


def run(cmd: list[str], *, env: dict[str, str] | None = None, input_text: str | None = None,
        ) -> str:
    """Run a command, raising CorpusError with its stderr so failures are diagnosable."""
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, input=input_text,
                          check=False)
    if proc.returncode != 0:
        raise CorpusError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


def data_segments(fd: int, size: int) -> Iterator[tuple[int, int]]:
    """Yield (offset, length) of allocated ranges using SEEK_DATA/SEEK_HOLE."""
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError:
            return
        end = os.lseek(fd, start, os.SEEK_HOLE)
        yield start, end - start
        pos = end


def allocated_bytes(path: Path) -> int:
    fd = os.open(path, os.O_RDONLY)
    try:
        return sum(n for _, n in data_segments(fd, os.fstat(fd).st_size))
    finally:
        os.close(fd)


def image_digest(path: Path) -> str:
    """sha256 over the allocation map and the allocated bytes.

    Cheaper than hashing the whole virtual size (mostly holes) and stricter: two images
    with equal content but different allocation get different digests.
    """
    h = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        h.update(struct.pack("<Q", size))
        for off, length in data_segments(fd, size):
            h.update(struct.pack("<QQ", off, length))
            pos = off
            while pos < off + length:
                buf = os.pread(fd, min(8 * MiB, off + length - pos), pos)
                h.update(buf)
                pos += len(buf)
    finally:
        os.close(fd)
    return h.hexdigest()


def sparse_copy(src: Path, dst: Path) -> None:
    """Copy an image preserving its allocation map exactly (holes stay holes).

    Like ``cp --sparse=auto`` but without depending on cp's heuristics, so the copy has the
    same data/hole map as the source; copy_file_range keeps the copy in the kernel.
    """
    tmp = dst.with_name(dst.name + ".part")
    sfd = os.open(src, os.O_RDONLY)
    dfd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        size = os.fstat(sfd).st_size
        os.ftruncate(dfd, size)
        for off, length in data_segments(sfd, size):
            done = 0
            while done < length:
                n = os.copy_file_range(sfd, dfd, length - done, off + done, off + done)
                if n <= 0:
                    raise CorpusError(f"copy_file_range stalled copying {src}")
                done += n
    finally:
        os.close(sfd)
        os.close(dfd)
    os.replace(tmp, dst)


def resparsify(path: Path) -> None:
    """Rewrite an image keeping only non-zero 4 KiB blocks as data.

    Used once after mkfs: mke2fs zeroes a few ranges (e.g. the end of the device) with
    BLKZEROOUT, which the loop driver turns into unwritten extents of the image file;
    SEEK_DATA reports those as data or hole depending on the page cache.  Zeros are
    zeros, so turning them into holes makes the allocation map reproducible.
    """
    tmp = path.with_name(path.name + ".part")
    sfd = os.open(path, os.O_RDONLY)
    dfd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    zero = bytes(FS_BLOCK)
    try:
        size = os.fstat(sfd).st_size
        os.ftruncate(dfd, size)
        for off, length in data_segments(sfd, size):
            for pos in range(off, off + length, MiB):
                buf = os.pread(sfd, min(MiB, off + length - pos), pos)
                for i in range(0, len(buf), FS_BLOCK):
                    blk = buf[i:i + FS_BLOCK]
                    if blk != zero[:len(blk)]:
                        os.pwrite(dfd, blk, pos + i)
    finally:
        os.close(sfd)
        os.close(dfd)
    os.replace(tmp, path)


def changed_blocks(prev: Path, cur: Path, block: int = CBT_BLOCK) -> list[list[int]]:
    """Ground-truth CBT extents between two images; see compare_images."""
    return compare_images(prev, cur, block)[0]


def compare_images(prev: Path, cur: Path, block: int = CBT_BLOCK,
                   ) -> tuple[list[list[int]], str]:
    """Extents of ``block``-sized blocks whose content differs, and ``cur``'s digest.

    Only the union of both images' allocated ranges is read (holes read as zeros, so a
    block that is a hole in one image and zeros in the other is not a change).  Large
    reads are compared first; only differing windows are refined block by block.  The
    same reads feed image_digest(cur), saving a third pass over the data.
    """
    afd = os.open(prev, os.O_RDONLY)
    bfd = os.open(cur, os.O_RDONLY)
    try:
        size = os.fstat(bfd).st_size
        if os.fstat(afd).st_size != size:
            raise CorpusError(f"{prev} and {cur} differ in virtual size")
        cur_segs = list(data_segments(bfd, size))
        ranges: list[tuple[int, int]] = []
        for segs in (list(data_segments(afd, size)), cur_segs):
            for off, length in segs:
                start = off - off % block
                end = min(size, -(-(off + length) // block) * block)
                ranges.append((start, end))
        ranges.sort()
        merged: list[list[int]] = []
        for start, end in ranges:
            if merged and start <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], end)
            else:
                merged.append([start, end])
        h = hashlib.sha256(struct.pack("<Q", size))
        si = 0
        started = False
        extents: list[list[int]] = []
        window = 64 * block
        for start, end in merged:
            pos = start
            while pos < end:
                n = min(window, end - pos)
                a = os.pread(afd, n, pos)
                b = os.pread(bfd, n, pos)
                # feed the digest with the parts of cur's data segments in this window
                while si < len(cur_segs) and cur_segs[si][0] < pos + n:
                    soff, slen = cur_segs[si]
                    if not started:
                        h.update(struct.pack("<QQ", soff, slen))
                        started = True
                    lo, hi = max(soff, pos), min(soff + slen, pos + n)
                    h.update(b[lo - pos:hi - pos])
                    if soff + slen > pos + n:
                        break
                    si += 1
                    started = False
                if a != b:
                    for i in range(0, n, block):
                        if a[i:i + block] != b[i:i + block]:
                            boff = pos + i
                            blen = min(block, end - boff)
                            if extents and extents[-1][0] + extents[-1][1] == boff:
                                extents[-1][1] += blen
                            else:
                                extents.append([boff, blen])
                pos += n
        return extents, h.hexdigest()
    finally:
        os.close(afd)
        os.close(bfd)


# --------------------------------------------------------------------------------------
# Source files from this machine
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SourceFile:
    path: str
    size: int
    mtime_ns: int


# Shares of --data taken from the host's /usr: binaries/libraries and /usr/share.
SYSTEM_SHARE = 0.55
SHARE_SHARE = 0.15
APP_SHARE = 0.27  # generated application data in the template (the rest is metadata)
CLONE_APP_SHARE = 0.15  # each clone's own application data


@dataclasses.dataclass
class SourceSelection:
    """The host files a corpus copies, chosen from a listing of /usr only.

    Each file's rank is a hash of (seed, path), not its position in the listing, and the
    fingerprint covers only the chosen files: installing an unrelated package changes the
    corpus (and invalidates the cache) only if one of its files ranks into the selection.
    The corpus can only be byte-identical where the chosen files are the same, which the
    fingerprint (path, size, mtime) checks without reading them.
    """

    system: list[SourceFile]
    share: list[SourceFile]
    fingerprint: str

    @classmethod
    def choose(cls, seed: int, data_bytes: int) -> SourceSelection:
        lists = [_list_files(SOURCE_ROOTS_SYSTEM), _list_files(SOURCE_ROOTS_SHARE)]
        if not lists[0]:
            raise CorpusError("no readable system files under /usr to build images from")
        chosen = [
            _rank_and_fill(seed, label, files, int(data_bytes * frac))
            for label, files, frac in (("system", lists[0], SYSTEM_SHARE),
                                       ("share", lists[1], SHARE_SHARE))
        ]
        h = hashlib.sha256()
        for group in chosen:
            for sf in group:
                h.update(f"{sf.path}\0{sf.size}\0{sf.mtime_ns}\n".encode())
            h.update(b"--\n")
        return cls(system=chosen[0], share=chosen[1], fingerprint=h.hexdigest())


def _list_files(roots: tuple[str, ...]) -> list[SourceFile]:
    """Regular files under ``roots`` (symlinks not followed), via scandir for speed."""
    found: list[SourceFile] = []
    stack = list(roots)
    while stack:
        d = stack.pop()
        try:
            it = os.scandir(d)
        except OSError:
            continue
        with it:
            for e in it:
                try:
                    if e.is_dir(follow_symlinks=False):
                        stack.append(e.path)
                    elif e.is_file(follow_symlinks=False):
                        st = e.stat(follow_symlinks=False)
                        if 0 < st.st_size <= SOURCE_MAX_FILE:
                            found.append(SourceFile(e.path, st.st_size, st.st_mtime_ns))
                except OSError:
                    continue
    return found


def _rank_and_fill(seed: int, label: str, files: list[SourceFile], budget: int,
                   ) -> list[SourceFile]:
    """Files in hash-rank order until ``budget`` bytes; returned in path order.

    No single file may take more than an eighth of the budget, so that a tiny corpus
    is not one big library.  Path order is the order they are written in, like an
    installer unpacking packages directory by directory.
    """
    def rank(sf: SourceFile) -> bytes:
        return hashlib.blake2b(f"{seed}:{label}:{sf.path}".encode(), digest_size=8).digest()

    cap = max(256 * 1024, budget // 8)
    chosen: list[SourceFile] = []
    used = 0
    for sf in sorted(files, key=rank):
        if used >= budget:
            break
        if sf.size > cap or sf.size > budget - used + 64 * 1024:
            continue
        chosen.append(sf)
        used += sf.size
    return sorted(chosen, key=lambda sf: sf.path)


def read_source(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return None


# --------------------------------------------------------------------------------------
# Generated content
# --------------------------------------------------------------------------------------


class ContentGen:
    """Seeded generator of text-like, database-like and random data.

    Text is assembled from per-kind pools of lines built from a Zipf-weighted seeded
    vocabulary: it compresses like real configuration, source and logs (3-5x), and is
    fast enough to produce hundreds of MiB in Python.
    """

    def __init__(self, seed: int) -> None:
        rng = derive_rng(seed, "vocab")
        letters = "etaoinshrdlcumwfgypbvkjxqz"
        lw = [12, 9, 8, 7.5, 7, 6.7, 6.3, 6, 4.3, 4, 2.8, 2.7, 2.4, 2.4, 2.2, 2, 2, 1.9, 1.5,
              1.3, 1, 0.8, 0.2, 0.2, 0.1, 0.1]
        words: list[str] = []
        seen: set[str] = set()
        while len(words) < 3000:
            w = "".join(rng.choices(letters, weights=lw, k=rng.randint(2, 11)))
            if w not in seen:
                seen.add(w)
                words.append(w)
        self.words = words
        self.cum = list(_cumulative([1.0 / (i + 1) for i in range(len(words))]))
        self.pools: dict[str, list[str]] = {
            kind: [self._line(rng, kind) for _ in range(4096)]
            for kind in ("conf", "src", "doc", "log")
        }
        self.records = [self._record(rng) for _ in range(1024)]

    def _w(self, rng: random.Random, k: int) -> list[str]:
        return rng.choices(self.words, cum_weights=self.cum, k=k)

    def _line(self, rng: random.Random, kind: str) -> str:
        w = self._w(rng, 12)
        if kind == "conf":
            if rng.random() < 0.25:
                return "# " + " ".join(w[: rng.randint(3, 11)])
            return f"{w[0]}_{w[1]} = {w[2]}{rng.choice(['', str(rng.randint(0, 4096))])}"
        if kind == "src":
            ind = "    " * rng.randint(0, 3)
            r = rng.random()
            if r < 0.15:
                return f"{ind}def {w[0]}_{w[1]}({w[2]}, {w[3]}={rng.randint(0, 99)}):"
            if r < 0.3:
                return f"{ind}if {w[0]}.{w[1]} > {rng.randint(0, 1000)}:"
            if r < 0.45:
                return f"{ind}# {' '.join(w[2:rng.randint(4, 12)])}"
            if r < 0.55:
                return ""
            return f"{ind}{w[0]} = {w[1]}({w[2]}, {w[3]}[{rng.randint(0, 64)}])"
        if kind == "log":
            proc = w[0][:8]
            return f"{proc}[{rng.randint(100, 32000)}]: {' '.join(w[1:rng.randint(4, 12)])}"
        return " ".join(w[: rng.randint(4, 12)]).capitalize() + "."

    def _record(self, rng: random.Random) -> bytes:
        name = " ".join(self._w(rng, 3)).encode()[:40].ljust(40, b"\0")
        return struct.pack("<QIIHH", rng.getrandbits(40), rng.randint(0, 1 << 20),
                           rng.randint(0, 99), rng.randint(0, 9), 0x3A2) + name

    def text(self, rng: random.Random, kind: str, nbytes: int) -> bytes:
        pool = self.pools[kind]
        k = max(1, nbytes // 40 + 1)
        out = bytearray()
        while len(out) < nbytes:
            out += "\n".join(rng.choices(pool, k=k)).encode() + b"\n"
        return bytes(out[:nbytes])

    def log_lines(self, rng: random.Random, nbytes: int, start: int, host: str) -> bytes:
        """Syslog-style lines with increasing timestamps starting at ``start``."""
        pool = self.pools["log"]
        out: list[str] = []
        total = 0
        t = start
        minute = -1
        prefix = ""
        while total < nbytes:
            t += rng.randint(0, 30)
            if t // 60 != minute:  # strftime per line would dominate the run time
                minute = t // 60
                prefix = time.strftime("%b %d %H:%M", time.gmtime(t))
            line = f"{prefix}:{t % 60:02d} {host} {rng.choice(pool)}"
            out.append(line)
            total += len(line) + 1
        return ("\n".join(out) + "\n").encode()

    def db_page(self, rng: random.Random, page_no: int, lsn: int) -> bytes:
        """An 8 KiB database-like page: header, ~75% records, free space as zeros."""
        recs = rng.choices(self.records, k=rng.randint(80, 100))
        body = b"".join(struct.pack("<I", rng.getrandbits(32)) + r[4:] for r in recs)
        page = struct.pack("<4sIQ", b"PGDB", page_no, lsn) + body
        return page[:8192].ljust(8192, b"\0")

    def db_file(self, rng: random.Random, nbytes: int, lsn: int) -> bytes:
        return b"".join(self.db_page(rng, i, lsn) for i in range(max(1, nbytes // 8192)))

    @staticmethod
    def random_bytes(rng: random.Random, nbytes: int) -> bytes:
        return b"".join(rng.randbytes(min(MiB, nbytes - i)) for i in range(0, nbytes, MiB))


def _cumulative(weights: list[float]) -> Iterator[float]:
    total = 0.0
    for w in weights:
        total += w
        yield total


def mutate_binary(rng: random.Random, data: bytes) -> bytes:
    """A plausible "new version" of a binary: scattered replacements, insertions, deletions.

    Insertions/deletions shift the rest of the file, as a rebuilt library does, so fixed
    64 KiB blocks after the first edit mostly differ while content-defined chunks survive.
    """
    buf = bytearray(data)
    for _ in range(1 + len(buf) // (256 * 1024)):
        if not buf:
            break
        pos = rng.randrange(len(buf))
        n = rng.randint(1, 64)
        r = rng.random()
        if r < 0.6:
            buf[pos:pos + n] = rng.randbytes(len(buf[pos:pos + n]))
        elif r < 0.8:
            buf[pos:pos] = rng.randbytes(n)
        else:
            del buf[pos:pos + n]
    return bytes(buf)


# --------------------------------------------------------------------------------------
# Kernel-side filesystem session
# --------------------------------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)


def _syncfs(fd: int) -> None:
    if _libc.syncfs(fd) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


class FsSession:
    """The ext4 root partition of one image, mounted read-write through a loop device.

    All data is written with O_DIRECT (padded to the fs block, then truncated), so every
    block allocation happens synchronously in this process, never in a writeback worker
    whose timing and CPU would change where blocks go.  The process is pinned to one CPU
    because ext4 keeps per-CPU preallocation groups for small files.  ``sync`` points are
    placed deterministically so the journal commits at the same operations every run.
    """

    def __init__(self, image: Path, layout: Layout, now: int) -> None:
        self.image = image
        self.layout = layout
        self.now = now
        self.loop: str | None = None
        self.mnt = Path(tempfile.mkdtemp(prefix="corpus-mnt-"))
        self.bytes_written = 0
        self.ops_since_sync = 0
        self.sync_every = 256
        self._saved_affinity: set[int] | None = None
        self._rootfd: int | None = None

    def __enter__(self) -> FsSession:
        self._saved_affinity = os.sched_getaffinity(0)
        os.sched_setaffinity(0, {min(self._saved_affinity)})
        try:
            self.loop = run(["losetup", "--find", "--show", "--offset",
                             str(self.layout.root_offset), "--sizelimit",
                             str(self.layout.root_size), str(self.image)]).strip()
            run(["mount", "-t", "ext4", "-o", MOUNT_OPTIONS, self.loop, str(self.mnt)])
            self._rootfd = os.open(self.mnt, os.O_RDONLY | os.O_DIRECTORY)
        except BaseException:
            self._teardown()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._teardown()

    def _teardown(self) -> None:
        if self._rootfd is not None:
            os.close(self._rootfd)
            self._rootfd = None
        if os.path.ismount(self.mnt):
            run(["umount", str(self.mnt)])
        if self.loop:
            run(["losetup", "--detach", self.loop])
            self.loop = None
        with contextlib.suppress(OSError):
            self.mnt.rmdir()
        if self._saved_affinity is not None:
            os.sched_setaffinity(0, self._saved_affinity)
            self._saved_affinity = None

    # -- helpers ---------------------------------------------------------------------

    def path(self, rel: str) -> Path:
        return self.mnt / rel.lstrip("/")

    def exists(self, rel: str) -> bool:
        return self.path(rel).exists()

    def size(self, rel: str) -> int:
        return self.path(rel).stat().st_size

    def sync(self) -> None:
        """Commit the journal now (and make freed blocks reusable) at a fixed point."""
        assert self._rootfd is not None
        _syncfs(self._rootfd)
        self.ops_since_sync = 0

    def _op(self) -> None:
        self.ops_since_sync += 1
        if self.ops_since_sync >= self.sync_every:
            self.sync()

    def _mkparents(self, p: Path) -> None:
        p.parent.mkdir(parents=True, exist_ok=True)

    def _direct_write(self, fd: int, offset: int, data: bytes | memoryview) -> None:
        """Write ``data`` at block-aligned ``offset`` with O_DIRECT from an aligned buffer."""
        n = len(data)
        padded = -(-n // FS_BLOCK) * FS_BLOCK
        if padded == 0:
            return
        chunk = 16 * MiB
        with mmap.mmap(-1, min(padded, chunk)) as buf:
            done = 0
            while done < padded:
                m = min(chunk, padded - done)
                piece = data[done:done + m]
                buf[: len(piece)] = piece
                if len(piece) < m:
                    buf[len(piece):m] = bytes(m - len(piece))
                view = memoryview(buf)[:m]
                try:
                    written = os.pwrite(fd, view, offset + done)
                finally:
                    view.release()
                if written != m:
                    raise CorpusError(f"short O_DIRECT write ({written} of {m})")
                done += m
        self.bytes_written += padded

    def _set_mtime(self, p: Path, mtime: int | None) -> None:
        t = self.now if mtime is None else mtime
        os.utime(p, ns=(t * 1_000_000_000, t * 1_000_000_000))

    # -- operations --------------------------------------------------------------------

    def write(self, rel: str, data: bytes, mtime: int | None = None) -> None:
        """Create (or truncate and rewrite) a file."""
        p = self.path(rel)
        self._mkparents(p)
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o644)
        try:
            self._direct_write(fd, 0, data)
            if len(data) % FS_BLOCK:
                os.ftruncate(fd, len(data))
        finally:
            os.close(fd)
        self._set_mtime(p, mtime)
        self._op()

    def replace(self, rel: str, data: bytes, mtime: int | None = None) -> None:
        """Install a new version the way dpkg does: write ``.dpkg-new``, rename over."""
        tmp = rel + ".dpkg-new"
        self.write(tmp, data, mtime)
        os.rename(self.path(tmp), self.path(rel))
        self._op()

    def append(self, rel: str, data: bytes) -> None:
        """Append by rewriting the partial last block and the new data with O_DIRECT."""
        p = self.path(rel)
        self._mkparents(p)
        fd = os.open(p, os.O_RDWR | os.O_CREAT | os.O_DIRECT, 0o644)
        try:
            size = os.fstat(fd).st_size
            start = size - size % FS_BLOCK
            head = b""
            if start < size:
                with open(p, "rb") as f:
                    f.seek(start)
                    head = f.read(size - start)
            self._direct_write(fd, start, head + data)
            os.ftruncate(fd, size + len(data))
        finally:
            os.close(fd)
        self._set_mtime(p, None)
        self._op()

    def patch(self, rel: str, offset: int, data: bytes) -> None:
        """Small in-place change; blocks are already allocated, so buffered I/O is safe."""
        p = self.path(rel)
        fd = os.open(p, os.O_WRONLY)
        try:
            os.pwrite(fd, data, offset)
        finally:
            os.close(fd)
        self.bytes_written += len(data)
        self._set_mtime(p, None)
        self._op()

    def delete(self, rel: str) -> None:
        self.path(rel).unlink()
        self._op()

    def rename(self, src: str, dst: str) -> None:
        os.rename(self.path(src), self.path(dst))
        self._op()

    def read(self, rel: str) -> bytes:
        return self.path(rel).read_bytes()


# --------------------------------------------------------------------------------------
# Post-unmount normalisation of kernel clock/random fields
# --------------------------------------------------------------------------------------

# ext4 superblock field offsets (relative to the superblock at partition + 1024)
SB_MTIME, SB_WTIME, SB_MAGIC = 0x2C, 0x30, 0x38
SB_LAST_MOUNTED = 0x88
SB_KBYTES_WRITTEN = 0x178
SB_WTIME_HI, SB_MTIME_HI = 0x274, 0x275
SB_FEATURE_COMPAT, SB_FEATURE_INCOMPAT, SB_FEATURE_RO_COMPAT = 0x5C, 0x60, 0x64
INCOMPAT_64BIT = 0x80
RO_COMPAT_GDT_CSUM = 0x10
RO_COMPAT_METADATA_CSUM = 0x400
BG_INODE_UNINIT = 0x1

# inode field offsets
I_MODE, I_ATIME, I_CTIME, I_MTIME, I_DTIME = 0x0, 0x8, 0xC, 0x10, 0x14
I_VERSION, I_GENERATION, I_EXTRA_ISIZE = 0x24, 0x64, 0x80
I_VERSION_HI = 0x98
I_CTIME_EXTRA, I_MTIME_EXTRA, I_ATIME_EXTRA, I_CRTIME, I_CRTIME_EXTRA = (
    0x84, 0x88, 0x8C, 0x90, 0x94)


@dataclasses.dataclass(frozen=True)
class FsGeometry:
    block_size: int
    inodes_per_group: int
    inode_size: int
    groups: int
    desc_size: int
    gdt_csum: bool
    journal_extents: tuple[tuple[int, int], ...]  # (fs block, count)


def _read_sb(fd: int, part: int) -> bytearray:
    sb = bytearray(os.pread(fd, 1024, part + 1024))
    if struct.unpack_from("<H", sb, SB_MAGIC)[0] != 0xEF53:
        raise CorpusError("no ext4 superblock at the root partition")
    return sb


def read_geometry(fd: int, part: int) -> FsGeometry:
    """Parse the few superblock/journal-inode fields the normaliser needs."""
    sb = _read_sb(fd, part)
    blocks_lo, = struct.unpack_from("<I", sb, 0x4)
    blocks_hi, = struct.unpack_from("<I", sb, 0x150)
    first_data, log_bs = struct.unpack_from("<II", sb, 0x14)
    bpg, = struct.unpack_from("<I", sb, 0x20)
    ipg, = struct.unpack_from("<I", sb, 0x28)
    inode_size, = struct.unpack_from("<H", sb, 0x58)
    incompat, ro_compat = struct.unpack_from("<II", sb, 0x60)
    if ro_compat & RO_COMPAT_METADATA_CSUM:
        raise CorpusError("metadata_csum images are not supported by the normaliser")
    bs = 1024 << log_bs
    blocks = blocks_lo | ((blocks_hi << 32) if incompat & INCOMPAT_64BIT else 0)
    groups = -(-(blocks - first_data) // bpg)
    desc_size = struct.unpack_from("<H", sb, 0xFE)[0] if incompat & INCOMPAT_64BIT else 32
    geo = FsGeometry(bs, ipg, inode_size, groups, desc_size or 32,
                     bool(ro_compat & RO_COMPAT_GDT_CSUM), ())
    journal_inum, = struct.unpack_from("<I", sb, 0xE0)
    raw = _read_inode(fd, part, geo, journal_inum)
    extents = tuple(_extent_leaves(fd, part, bs, raw[0x28:0x28 + 60]))
    return dataclasses.replace(geo, journal_extents=extents)


def _group_desc(fd: int, part: int, geo: FsGeometry, group: int) -> bytes:
    gdt = part + (geo.block_size if geo.block_size > 1024 else 2048)
    return os.pread(fd, geo.desc_size, gdt + group * geo.desc_size)


def _inode_table(desc: bytes, geo: FsGeometry) -> int:
    lo, = struct.unpack_from("<I", desc, 0x8)
    hi = struct.unpack_from("<I", desc, 0x28)[0] if geo.desc_size >= 64 else 0
    return lo | (hi << 32)


def _read_inode(fd: int, part: int, geo: FsGeometry, ino: int) -> bytes:
    group, index = divmod(ino - 1, geo.inodes_per_group)
    table = _inode_table(_group_desc(fd, part, geo, group), geo)
    return os.pread(fd, geo.inode_size, part + table * geo.block_size + index * geo.inode_size)


def _extent_leaves(fd: int, part: int, bs: int, node: bytes) -> Iterator[tuple[int, int]]:
    magic, entries, _max, depth = struct.unpack_from("<HHHH", node, 0)
    if magic != 0xF30A:
        raise CorpusError("journal inode has no extent tree")
    for i in range(entries):
        e = 12 + 12 * i
        if depth == 0:
            _lblk, length, start_hi, start_lo = struct.unpack_from("<IHHI", node, e)
            yield (start_hi << 32) | start_lo, length & 0x7FFF
        else:
            _lblk, leaf_lo, leaf_hi = struct.unpack_from("<IIH", node, e)
            child = os.pread(fd, bs, part + ((leaf_hi << 32) | leaf_lo) * bs)
            yield from _extent_leaves(fd, part, bs, child)


def normalize_fs(image: Path, layout: Layout, seed: int, now: int, kbytes_written: int,
                 journal_block0: bytes) -> None:
    """Replace every kernel-clock/random value left by the mount session.

    * Inodes: mtime/ctime/crtime/atime/dtime values from the real clock become ``now``
      (the fake day time), their nanoseconds 0; inodes created in this session get a
      generation derived from (seed, inode number) instead of the kernel's random one;
      the i_version change counter of touched inodes becomes day + 1.
    * Superblock: mount/write time, last-mounted path and lifetime-writes counter.
    * Journal: reset to the state mkfs left (clean, empty).  After a clean unmount the
      log content is dead, but it holds copies of metadata with real timestamps.
    Without metadata_csum (see docs) none of these fields is covered by a checksum.
    """
    fd = os.open(image, os.O_RDWR)
    try:
        part = layout.root_offset
        geo = read_geometry(fd, part)
        bs = geo.block_size
        for g in range(geo.groups):
            desc = _group_desc(fd, part, geo, g)
            flags, = struct.unpack_from("<H", desc, 0x12)
            used = geo.inodes_per_group
            if geo.gdt_csum:
                if flags & BG_INODE_UNINIT:
                    continue
                unused = struct.unpack_from("<H", desc, 0x1C)[0]
                if geo.desc_size >= 64:
                    unused |= struct.unpack_from("<H", desc, 0x32)[0] << 16
                used -= unused
            if used <= 0:
                continue
            base = part + _inode_table(desc, geo) * bs
            length = used * geo.inode_size
            table = bytearray(os.pread(fd, length, base))
            if _normalize_inodes(table, geo, g, seed, now):
                os.pwrite(fd, table, base)
        sb = _read_sb(fd, part)
        struct.pack_into("<II", sb, SB_MTIME, now, now)
        sb[SB_WTIME_HI] = 0
        sb[SB_MTIME_HI] = 0
        sb[SB_LAST_MOUNTED:SB_LAST_MOUNTED + 64] = b"/".ljust(64, b"\0")
        struct.pack_into("<Q", sb, SB_KBYTES_WRITTEN, kbytes_written)
        os.pwrite(fd, sb, part + 1024)
        _reset_journal(fd, part, geo, journal_block0)
    finally:
        os.close(fd)


def _fake_time(table: bytearray, o: int, t: int, fake: int, extra_field: int | None) -> int:
    """An inode time set in this session becomes ``fake``, its extra (nanosecond) field zero."""
    if t < REAL_TIME_THRESHOLD:
        return t
    if extra_field is not None:
        table[o + extra_field:o + extra_field + 4] = bytes(4)
    return fake


def _normalize_inodes(table: bytearray, geo: FsGeometry, group: int, seed: int,
                      now: int) -> bool:
    changed = False
    isz = geo.inode_size
    for idx in range(len(table) // isz):
        o = idx * isz
        mode, = struct.unpack_from("<H", table, o + I_MODE)
        atime, ctime, mtime, dtime = struct.unpack_from("<IIII", table, o + I_ATIME)
        if mode == 0 and dtime == 0:
            continue
        extra = isz > 128 and struct.unpack_from("<H", table, o + I_EXTRA_ISIZE)[0] >= 24
        crtime = struct.unpack_from("<I", table, o + I_CRTIME)[0] if extra else 0
        if max(atime, ctime, mtime, dtime, crtime) < REAL_TIME_THRESHOLD:
            continue
        changed = True
        mtime = _fake_time(table, o, mtime, now, I_MTIME_EXTRA if extra else None)
        ctime = _fake_time(table, o, ctime, now, I_CTIME_EXTRA if extra else None)
        atime = _fake_time(table, o, atime, mtime, I_ATIME_EXTRA if extra else None)
        if dtime >= REAL_TIME_THRESHOLD:
            dtime = now
        struct.pack_into("<IIII", table, o + I_ATIME, atime, ctime, mtime, dtime)
        # The change counter is bumped or not depending on whether two updates fall in
        # the same clock tick; "touched on day d" -> d + 1 is monotonic and stable.
        struct.pack_into("<I", table, o + I_VERSION, 1 + (now - FAKE_EPOCH) // DAY_SECONDS)
        if isz > 128 and struct.unpack_from("<H", table, o + I_EXTRA_ISIZE)[0] >= 28:
            struct.pack_into("<I", table, o + I_VERSION_HI, 0)
        if extra and crtime >= REAL_TIME_THRESHOLD:
            # Created in this session: the kernel also gave it a random generation.
            ino = group * geo.inodes_per_group + idx + 1
            gen = zlib.crc32(f"{seed}:{ino}:{now}".encode())
            struct.pack_into("<I", table, o + I_GENERATION, gen)
            struct.pack_into("<II", table, o + I_CRTIME, now, 0)
    return changed


def _reset_journal(fd: int, part: int, geo: FsGeometry, block0: bytes) -> None:
    bs = geo.block_size
    zero = bytes(1 * MiB)
    first = True
    for start, count in geo.journal_extents:
        pos = part + start * bs
        end = pos + count * bs
        if first:
            os.pwrite(fd, block0, pos)
            pos += bs
            first = False
        while pos < end:
            n = min(len(zero), end - pos)
            if os.pread(fd, n, pos) != zero[:n]:
                os.pwrite(fd, zero[:n], pos)
            pos += n


def journal_block0(image: Path, layout: Layout) -> bytes:
    fd = os.open(image, os.O_RDONLY)
    try:
        geo = read_geometry(fd, layout.root_offset)
        start = geo.journal_extents[0][0]
        return os.pread(fd, geo.block_size, layout.root_offset + start * geo.block_size)
    finally:
        os.close(fd)


def kbytes_written(image: Path, layout: Layout) -> int:
    fd = os.open(image, os.O_RDONLY)
    try:
        return struct.unpack_from("<Q", _read_sb(fd, layout.root_offset), SB_KBYTES_WRITTEN)[0]
    finally:
        os.close(fd)


# --------------------------------------------------------------------------------------
# Image creation
# --------------------------------------------------------------------------------------


def plan_layout(size: int) -> Layout:
    efi = max(MiB, min(32 * MiB, (size // 64) // MiB * MiB))
    first = MiB
    root_offset = first + efi
    root_end = size - 34 * SECTOR  # backup GPT
    root_size = (root_end - root_offset) // MiB * MiB
    if root_size < 16 * MiB:
        raise CorpusError(f"--size {size} is too small for the partition layout")
    return Layout(size, first, efi, root_offset, root_size)


def _mkfs_env() -> dict[str, str]:
    env = dict(os.environ)
    env["E2FSPROGS_FAKE_TIME"] = str(MKFS_TIME)
    env["SOURCE_DATE_EPOCH"] = str(MKFS_TIME)
    env["MKE2FS_CONFIG"] = "/dev/null"  # host mke2fs.conf must not change the result
    return env


def create_blank_image(path: Path, seed: int, layout: Layout) -> None:
    """Sparse file, GPT with fixed GUIDs, ext4 made through an offset loop device.

    The ext4 features are spelled out (the host's mke2fs.conf is ignored) and UUID/hash
    seed come from the seed.  Inode tables and journal are not zeroed (lazy_*_init=1):
    mke2fs would zero them with BLKZEROOUT, which the loop driver turns into unwritten
    extents of the image file, and SEEK_DATA reports those as data or hole depending on
    the page cache, so the allocation map would not be reproducible.  metadata_csum is
    left out on purpose: its checksums cover the kernel's random inode generations (see
    docs/corpus.md).
    """
    path.unlink(missing_ok=True)
    with open(path, "wb") as f:
        f.truncate(layout.size)
    script = "\n".join([
        "label: gpt",
        f"label-id: {seeded_uuid(seed, 'disk')}",
        "first-lba: 2048",
        f"start={layout.efi_offset // SECTOR}, size={layout.efi_size // SECTOR}, "
        f"type={GPT_EFI}, uuid={seeded_uuid(seed, 'part-efi')}, name=\"EFI\"",
        f"start={layout.root_offset // SECTOR}, size={layout.root_size // SECTOR}, "
        f"type={GPT_LINUX_FS}, uuid={seeded_uuid(seed, 'part-root')}, name=\"root\"",
        "",
    ])
    run(["sfdisk", "--quiet", "--no-reread", "--no-tell-kernel", str(path)], input_text=script)
    loop = run(["losetup", "--find", "--show", "--offset", str(layout.root_offset),
                "--sizelimit", str(layout.root_size), str(path)]).strip()
    try:
        run(["mke2fs", "-q", "-F", "-t", "ext4", "-b", "4096", "-I", "256", "-i", "16384",
             "-m", "5", "-L", "root",
             "-O", "has_journal,extent,huge_file,flex_bg,uninit_bg,64bit,dir_nlink,"
                   "extra_isize,sparse_super,large_file,filetype,resize_inode,dir_index,"
                   "ext_attr",
             "-U", seeded_uuid(seed, "fs"),
             "-E", f"hash_seed={seeded_uuid(seed, 'hash')},lazy_itable_init=1,"
                   "lazy_journal_init=1,nodiscard",
             loop], env=_mkfs_env())
    finally:
        run(["losetup", "--detach", loop])
    resparsify(path)


def write_efi(path: Path, layout: Layout, sources: SourceSelection) -> None:
    """Fill the start of the EFI-ish partition with a boot-loader-like blob (no FAT)."""
    blob = b""
    for sf in sources.system:
        if sf.size >= 64 * 1024:
            data = read_source(sf.path)
            if data and data[:4] == b"\x7fELF":
                blob = data
                break
    blob = (b"REPOFS-CORPUS-EFI\0" + blob)[: min(layout.efi_size // 4, 2 * MiB)]
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, blob, layout.efi_offset)
    finally:
        os.close(fd)


# --------------------------------------------------------------------------------------
# Content of the VMs
# --------------------------------------------------------------------------------------


@dataclasses.dataclass
class Inventory:
    """Which files a VM has, per kind; drives the daily changes.  Ordered = deterministic."""

    system: list[str] = dataclasses.field(default_factory=list)  # copied binaries/libs
    share: list[str] = dataclasses.field(default_factory=list)
    text: list[str] = dataclasses.field(default_factory=list)
    logs: list[str] = dataclasses.field(default_factory=list)
    db: list[str] = dataclasses.field(default_factory=list)
    blobs: list[str] = dataclasses.field(default_factory=list)
    serial: int = 0

    def next_name(self, prefix: str, suffix: str) -> str:
        self.serial += 1
        return f"{prefix}{self.serial:06d}{suffix}"


def _copy_host_files(fs: FsSession, seed: int, files: list[SourceFile], dest: list[str],
                     derive_fraction: float) -> None:
    """Copy the selected host files to the same paths, some of them slightly altered.

    Each file's choices come from its own PRNG stream (seed, path), so one file that
    cannot be read does not change what happens to the others.
    """
    for sf in files:
        data = read_source(sf.path)
        if data is None:
            continue
        rng = derive_rng(seed, "host-file", sf.path)
        if rng.random() < derive_fraction:
            data = mutate_binary(rng, data)
        mtime = FAKE_EPOCH - rng.randint(2 * DAY_SECONDS, 3 * 365 * DAY_SECONDS)
        rel = sf.path.lstrip("/")
        fs.write(rel, data, mtime)
        dest.append(rel)


def _add_app_data(fs: FsSession, rng: random.Random, gen: ContentGen, inv: Inventory,
                  budget: int, root: str, host: str) -> None:
    """Generated application data: configs, source, logs, database files, blobs."""
    shares = {"conf": 0.03, "src": 0.22, "doc": 0.05, "log": 0.15, "db": 0.25, "blob": 0.18,
              "gz": 0.12}
    now = fs.now
    for kind, frac in shares.items():
        left = int(budget * frac)
        while left > 0:
            if kind in ("conf", "src", "doc"):
                n = min(left, int(rng.lognormvariate(9.0, 1.2)) + 64)
                ext = {"conf": ".conf", "src": ".py", "doc": ".txt"}[kind]
                d = {"conf": f"{root}/etc", "src": f"{root}/src", "doc": f"{root}/doc"}[kind]
                rel = inv.next_name(f"{d}/{rng.choice(gen.words)}_", ext)
                fs.write(rel, gen.text(rng, kind, n), now - rng.randint(0, 400) * DAY_SECONDS)
                inv.text.append(rel)
            elif kind == "log":
                n = min(left, rng.randint(256 * 1024, 4 * MiB))
                rel = inv.next_name(f"var/log/{host}/{rng.choice(gen.words)}_", ".log")
                fs.write(rel, gen.log_lines(rng, n, now - 30 * DAY_SECONDS, host))
                inv.logs.append(rel)
            elif kind == "db":
                n = min(left, rng.randint(1 * MiB, 32 * MiB))
                n = max(8192, n // 8192 * 8192)
                rel = inv.next_name(f"{root}/db/table_", ".dat")
                fs.write(rel, gen.db_file(rng, n, 1))
                inv.db.append(rel)
            elif kind == "blob":
                n = min(left, int(rng.lognormvariate(12.5, 1.5)) + 512)
                rel = inv.next_name(f"{root}/blobs/obj_", ".bin")
                fs.write(rel, gen.random_bytes(rng, n))
                inv.blobs.append(rel)
            else:
                raw = gen.text(rng, "doc", min(left * 3, rng.randint(64 * 1024, 8 * MiB)))
                data = gzip.compress(raw, compresslevel=1, mtime=0)
                n = len(data)
                rel = inv.next_name(f"{root}/archive/bundle_", ".gz")
                fs.write(rel, data, now - rng.randint(0, 400) * DAY_SECONDS)
                inv.blobs.append(rel)
            left -= n


def build_template(image: Path, layout: Layout, params: Params, sources: SourceSelection,
                   gen: ContentGen) -> Inventory:
    """Day 0 of VM 1: the OS install plus its application data."""
    rng = derive_rng(params.seed, "template")
    create_blank_image(image, params.seed, layout)
    write_efi(image, layout, sources)
    jb0 = journal_block0(image, layout)
    kb = kbytes_written(image, layout)
    inv = Inventory()
    budget = params.data_bytes
    with FsSession(image, layout, FAKE_EPOCH) as fs:
        fs.sync_every = _sync_interval(layout)
        t0 = time.monotonic()
        _copy_host_files(fs, params.seed, sources.system, inv.system, 0.1)
        _copy_host_files(fs, params.seed, sources.share, inv.share, 0.0)
        t1 = time.monotonic()
        _add_app_data(fs, rng, gen, inv, int(budget * APP_SHARE), "srv/app", "vm1")
        fs.sync()
        log.info("template: %d system files in %.1fs, app data in %.1fs",
                 len(inv.system) + len(inv.share), t1 - t0, time.monotonic() - t1)
        kb += fs.bytes_written // 1024
    normalize_fs(image, layout, params.seed, FAKE_EPOCH, kb, jb0)
    return inv


def _sync_interval(layout: Layout) -> int:
    """Operations between journal commits: well below what would fill a transaction.

    jbd2 starts a commit on its own once a transaction reaches a quarter of the journal;
    that commit would finish asynchronously and make freed blocks reusable at a
    timing-dependent point, so we commit first.
    """
    return 64 if layout.root_size < 2 * GiB else 256


# Share of a day's changed-block budget per kind of change.  Each operation is charged
# its data blocks plus one block for the metadata it dirties (mostly its inode: the
# inode table is spread over the disk, 256 inodes per 64 KiB block), measured to land
# near the target on the default corpus.
DAY_MIX: dict[str, float] = {
    "patch": 0.16,  # in-place byte patches of binaries
    "db": 0.14,  # in-place 8 KiB database page rewrites
    "package": 0.25,  # files replaced by new versions (write new + rename over old)
    "logs": 0.10,  # appends to some logs, plus one rotation
    "delete": 0.05,  # objects deleted (frees blocks; changes metadata only)
    "new_text": 0.18,  # new compressible files
    "new_random": 0.12,  # new incompressible files
}


def _cost(nbytes: int) -> int:
    """Estimated changed 64 KiB blocks of writing ``nbytes`` to a new place (+ inode)."""
    return 1 + -(-nbytes // CBT_BLOCK)


def apply_day(fs: FsSession, rng: random.Random, gen: ContentGen, inv: Inventory,
              target_chunks: int, host: str, root: str,
              mix: dict[str, float] | None = None) -> None:
    """One day of server life, sized to touch about ``target_chunks`` 64 KiB blocks."""
    mix = DAY_MIX if mix is None else mix
    # Operations of one day share metadata blocks (bitmaps, directories, inode table
    # blocks), so the per-operation charges overestimate; 1.3 was measured on the
    # default corpus to bring the total to the target.
    c = max(8, round(target_chunks * 1.3))
    lsn = 1 + (fs.now - FAKE_EPOCH) // 60

    # 1. security fixes patched in place: tiny byte changes in binaries
    budget = mix["patch"] * c
    while budget > 0 and inv.system:
        rel = rng.choice(inv.system)
        size = fs.size(rel)
        n = rng.randint(1, 16)
        if size > n:
            fs.patch(rel, rng.randrange(0, size - n), rng.randbytes(n))
        budget -= 2

    # 2. database pages updated in place (hot tables get several pages)
    budget = mix["db"] * c
    while budget > 0 and inv.db:
        rel = rng.choice(inv.db)
        pages = fs.size(rel) // 8192
        for _ in range(rng.randint(1, 4)):
            if pages and budget > 0:
                p = rng.randrange(pages)
                fs.patch(rel, p * 8192, gen.db_page(rng, p, lsn))
                budget -= 1
        budget -= 1
    fs.sync()

    # 3. package upgrade: runs of files from one directory replaced by new versions
    budget = mix["package"] * c
    while budget > 0 and inv.system:
        anchor = rng.randrange(len(inv.system))
        d = os.path.dirname(inv.system[anchor])
        for rel in inv.system[anchor:anchor + 12]:
            if os.path.dirname(rel) != d or budget <= 0:
                break
            if _cost(fs.size(rel)) > max(budget, 2):
                continue
            new = mutate_binary(rng, fs.read(rel))
            fs.replace(rel, new)
            budget -= _cost(len(new))
        budget -= 1  # the directory block
    fs.sync()

    # 4. logs appended, and one log rotated (compressed copy, then truncated)
    budget = mix["logs"] * c
    if inv.logs:
        rel = rng.choice(inv.logs)
        data = fs.read(rel)
        if len(data) > 64 * 1024 and _cost(len(data) // 4) < budget:
            rotated = inv.next_name(rel + ".", ".gz")
            gz = gzip.compress(data, compresslevel=6, mtime=0)
            fs.write(rotated, gz)
            inv.blobs.append(rotated)
            fs.write(rel, b"")
            budget -= _cost(len(gz)) + 1
        while budget > 0:
            rel = rng.choice(inv.logs)
            fs.append(rel, gen.log_lines(rng, rng.randint(512, 48 * 1024),
                                         fs.now - DAY_SECONDS, host))
            budget -= 2

    # 5. deletions: old objects and documents go away (their blocks become free)
    budget = mix["delete"] * c
    while budget > 0 and len(inv.blobs) > 4:
        rel = inv.blobs.pop(rng.randrange(len(inv.blobs)))
        fs.delete(rel)
        budget -= 1
        if len(inv.text) > 8 and rng.random() < 0.5:
            fs.delete(inv.text.pop(rng.randrange(len(inv.text))))
            budget -= 1
    fs.sync()

    # 6. new compressible data: source, documents, a new database segment
    budget = mix["new_text"] * c
    while budget > 0:
        room = int(budget) * CBT_BLOCK
        if rng.random() < 0.3:
            n = max(8192, min(room, rng.randint(64 * 1024, 4 * MiB)) // 8192 * 8192)
            rel = inv.next_name(f"{root}/db/table_", ".dat")
            fs.write(rel, gen.db_file(rng, n, lsn))
            inv.db.append(rel)
        else:
            kind = rng.choice(["src", "doc", "conf"])
            n = max(64, min(room, int(rng.lognormvariate(9.5, 1.2)) + 64))
            rel = inv.next_name(f"{root}/{kind}/{rng.choice(gen.words)}_", ".txt")
            fs.write(rel, gen.text(rng, kind, n))
            inv.text.append(rel)
        budget -= _cost(n)

    # 7. new incompressible data: uploads, encrypted or compressed objects
    budget = mix["new_random"] * c
    while budget > 0:
        room = int(budget) * CBT_BLOCK
        n = max(512, min(room, int(rng.lognormvariate(12.5, 1.5)) + 512))
        rel = inv.next_name(f"{root}/blobs/obj_", ".bin")
        fs.write(rel, gen.random_bytes(rng, n))
        inv.blobs.append(rel)
        budget -= _cost(n)
    fs.sync()


def run_vm(out_dir: Path, layout: Layout, params: Params, vm_index: int, template: Path,
           inv: Inventory) -> VmRecord:
    """Build one VM's chain of images; VM 1 starts from the template, others clone it."""
    name = f"vm{vm_index}"
    vm_dir = out_dir / name
    vm_dir.mkdir(parents=True, exist_ok=True)
    gen = ContentGen(params.seed)
    jb0 = journal_block0(template, layout)
    host = f"{name}-host"
    root = "srv/app" if vm_index == 1 else f"srv/{name}"
    day0 = vm_dir / "day0.img"
    days: list[DayRecord] = []
    if vm_index == 1:
        if template != day0:
            sparse_copy(template, day0)
    else:
        rng = derive_rng(params.seed, name, "clone")
        sparse_copy(template, day0)
        kb = kbytes_written(day0, layout)
        with FsSession(day0, layout, FAKE_EPOCH) as fs:
            fs.sync_every = _sync_interval(layout)
            _add_app_data(fs, rng, gen, inv, int(params.data_bytes * CLONE_APP_SHARE), root, name)
            fs.sync()
            kb += fs.bytes_written // 1024
        normalize_fs(day0, layout, params.seed, FAKE_EPOCH, kb, jb0)
        log.info("%s day 0 cloned from the template", name)
    alloc = allocated_bytes(day0)
    days.append(DayRecord(0, f"{name}/day0.img", None, alloc, None, None, image_digest(day0)))
    prev = day0
    for d in range(1, params.days + 1):
        cur = vm_dir / f"day{d}.img"
        t_start = time.monotonic()
        sparse_copy(prev, cur)
        t_copy = time.monotonic()
        now = FAKE_EPOCH + d * DAY_SECONDS
        rng = derive_rng(params.seed, name, "day", d)
        target = int(params.change_rate * alloc / CBT_BLOCK)
        kb = kbytes_written(cur, layout)
        with FsSession(cur, layout, now) as fs:
            fs.sync_every = _sync_interval(layout)
            apply_day(fs, rng, gen, inv, target, host, root)
            kb += fs.bytes_written // 1024
        normalize_fs(cur, layout, params.seed, now, kb, jb0)
        t_norm = time.monotonic()
        extents, digest = compare_images(prev, cur)
        cbt_rel = f"{name}/day{d}.cbt.json"
        (out_dir / cbt_rel).write_text(
            json.dumps({"block_size": CBT_BLOCK, "extents": extents}) + "\n")
        changed = sum(n for _, n in extents)
        alloc = allocated_bytes(cur)
        days.append(DayRecord(d, f"{name}/day{d}.img", cbt_rel, alloc, changed,
                              -(-changed // CBT_BLOCK), digest))
        log.info("%s day %d: copy %.1fs, changes %.1fs, cbt+digest %.1fs; %d blocks changed",
                 name, d, t_copy - t_start, t_norm - t_copy, time.monotonic() - t_norm,
                 days[-1].changed_blocks)
        prev = cur
    return VmRecord(name, None if vm_index == 1 else "vm1/day0.img", days)


# --------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------


def _check_params(params: Params) -> None:
    if params.size < 64 * MiB or params.size % MiB:
        raise CorpusError("--size must be a multiple of 1 MiB and at least 64 MiB")
    if not 0 <= params.days <= MAX_DAYS:
        raise CorpusError(f"--days must be within 0..{MAX_DAYS}")
    if params.vms < 1:
        raise CorpusError("--vms must be at least 1")
    if not 0 < params.change_rate <= 0.5:
        raise CorpusError("--change-rate must be in (0, 0.5]")
    root = plan_layout(params.size).root_size
    growth = params.data_bytes * (0.15 + params.change_rate * params.days * 0.6)
    if params.data_bytes + growth > root * 0.75:
        raise CorpusError(f"--data {params.data_bytes} does not fit a {root}-byte partition")
    if os.geteuid() != 0:
        raise CorpusError("corpus generation needs root (loop devices and mount)")


def load_cached(out_dir: Path, params: Params, fingerprint: str) -> Manifest | None:
    """Return the existing manifest if ``out_dir`` holds a complete identical corpus."""
    mpath = out_dir / "manifest.json"
    try:
        manifest = Manifest.from_json(mpath.read_text())
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if (not manifest.complete or manifest.format != MANIFEST_FORMAT
            or manifest.generator_version != GENERATOR_VERSION
            or manifest.params != params.as_dict()
            or manifest.source_fingerprint != fingerprint):
        return None
    for vm in manifest.vms:
        for day in vm.days:
            img = out_dir / day.image
            if not img.is_file() or img.stat().st_size != params.size:
                return None
            if day.cbt and not (out_dir / day.cbt).is_file():
                return None
    return manifest


def generate(out_dir: str | os.PathLike[str], seed: int, size: int = 8 * GiB,
             data_bytes: int = 2 * GiB, days: int = 5, vms: int = 2,
             change_rate: float = 0.01, workers: int | None = None) -> Manifest:
    """Generate (or reuse from cache) a corpus in ``out_dir``; return its manifest."""
    params = Params(seed, size, data_bytes, days, vms, change_rate)
    _check_params(params)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sources = SourceSelection.choose(seed, data_bytes)
    cached = load_cached(out, params, sources.fingerprint)
    if cached is not None:
        return cached
    (out / "manifest.json").unlink(missing_ok=True)
    for old in sorted(out.glob("vm*")):
        if old.is_dir() and old.name[2:].isdigit():
            shutil.rmtree(old)
    layout = plan_layout(size)
    gen = ContentGen(seed)
    (out / "vm1").mkdir()
    template = out / "vm1" / "day0.img"
    t0 = time.monotonic()
    inv = build_template(template, layout, params, sources, gen)
    log.info("template (vm1 day 0) built in %.1fs", time.monotonic() - t0)
    n_workers = workers or min(vms, len(os.sched_getaffinity(0)))
    records: list[VmRecord]
    if n_workers <= 1 or vms == 1:
        records = [run_vm(out, layout, params, i, template, copy.deepcopy(inv))
                   for i in range(1, vms + 1)]
    else:
        with ProcessPoolExecutor(n_workers, mp_context=get_context("fork")) as pool:
            futures = [pool.submit(run_vm, out, layout, params, i, template,
                                   copy.deepcopy(inv))
                       for i in range(1, vms + 1)]
            records = [f.result() for f in futures]
    manifest = Manifest(params=params.as_dict(), source_fingerprint=sources.fingerprint,
                        layout=layout.as_dict(), vms=records)
    tmp = out / "manifest.json.tmp"
    tmp.write_text(manifest.to_json())
    os.replace(tmp, out / "manifest.json")
    return manifest


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, type=Path, help="corpus directory")
    ap.add_argument("--seed", required=True, type=int)
    ap.add_argument("--size", type=parse_size, default=8 * GiB, help="virtual disk size")
    ap.add_argument("--data", type=parse_size, default=2 * GiB, help="data in the template")
    ap.add_argument("--days", type=int, default=5)
    ap.add_argument("--vms", type=int, default=2)
    ap.add_argument("--change-rate", type=float, default=0.01,
                    help="target fraction of allocated 64 KiB blocks changed per day")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s corpus: %(message)s",
                        stream=sys.stderr)
    t0 = time.monotonic()
    try:
        m = generate(args.out, args.seed, args.size, args.data, args.days, args.vms,
                     args.change_rate)
    except CorpusError as exc:
        print(f"corpus: error: {exc}", file=sys.stderr)
        return 1
    elapsed = time.monotonic() - t0
    for vm in m.vms:
        for d in vm.days:
            pct = ("" if d.changed_bytes is None
                   else f" changed={d.changed_bytes / max(1, d.allocated_bytes):.2%}")
            print(f"{d.image}: allocated={d.allocated_bytes / MiB:.1f}MiB{pct}")
    print(f"corpus ready in {args.out} ({elapsed:.1f}s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
