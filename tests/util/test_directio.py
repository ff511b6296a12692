"""The read-ahead reader that ingest uses for raw images: the bytes pread gives, any range."""

from __future__ import annotations

import os
import random
import subprocess
import time
from pathlib import Path

import pytest

from ingest.formats.raw import RawSource
from repofs.errors import SourceError
from repofs.util.directio import SequentialReader
from tests.support.helpers import skip_unless_o_direct

MiB = 1024 * 1024


def _image(path: Path, size: int) -> bytes:
    """A file of random bytes with a hole in the middle, ``size`` not a multiple of 4096."""
    data = bytearray(random.Random(7).randbytes(size))
    data[MiB : 2 * MiB] = bytes(MiB)
    with open(path, "wb") as f:
        f.write(data[:MiB])
        f.seek(2 * MiB)
        f.write(data[2 * MiB :])
    return bytes(data)


def test_ranges_read_back_as_pread_would(tmp_path: Path) -> None:
    """Aligned, unaligned, across the end and past the end: each equals the file's bytes."""
    skip_unless_o_direct(tmp_path)  # the fast path is the one tested; the fallback is pread's
    size = 3 * MiB + 1000
    data = _image(tmp_path / "img", size)
    ranges = [(0, MiB), (MiB, MiB), (2 * MiB, MiB), (3 * MiB, 64 * 1024), (4096 + 3, 5000),
              (size - 1000, 1000), (4 * MiB, 4096)]
    fd = os.open(tmp_path / "img", os.O_RDONLY)
    try:
        with SequentialReader(fd, iter(ranges)) as reader:
            assert reader.direct
            got = list(reader)
    finally:
        os.close(fd)
    assert [(o, n) for o, n, _ in got] == ranges
    for offset, length, piece in got:
        assert piece == data[offset : offset + length], (offset, length)


def test_error_surfaces_at_its_range(tmp_path: Path) -> None:
    """A read that fails raises from the iterator with the offset, after the ranges before it."""
    fd = os.open(tmp_path, os.O_RDONLY)  # a directory: every read fails with EISDIR
    try:
        with SequentialReader(fd, iter([(8192, 4096)])) as reader, pytest.raises(OSError) as info:
            list(reader)
    finally:
        os.close(fd)
    assert getattr(info.value, "read_offset", None) == 8192


def test_stopping_early_does_not_hang(tmp_path: Path) -> None:
    """A consumer that stops after one range (an ingest failing) closes the reader promptly."""
    _image(tmp_path / "img", 3 * MiB)
    fd = os.open(tmp_path / "img", os.O_RDONLY)
    try:
        reader = SequentialReader(fd, iter([(0, 64 * 1024)] * 10_000), depth=2)
        next(iter(reader))
        t0 = time.monotonic()
        reader.close()
        assert time.monotonic() - t0 < 2
    finally:
        os.close(fd)


def test_raw_source_sequence_pads_and_names_truncation(tmp_path: Path) -> None:
    """The sector padding reads as zeros; a file cut short under the reader is a one-line error."""
    size = 3 * MiB + 100  # capacity rounds up to 512-byte sectors
    data = _image(tmp_path / "img", size)
    with RawSource(str(tmp_path / "img")) as src:
        assert src.size == 3 * MiB + 512
        (whole,) = src.read_sequence(iter([(0, src.size)]))
        assert whole == data + bytes(412)
        os.truncate(tmp_path / "img", MiB // 2)
        with pytest.raises(SourceError, match="truncated"):
            list(src.read_sequence(iter([(0, MiB)])))


def test_block_device_reads_direct(tmp_path: Path) -> None:
    """A loop device (an LVM snapshot's stand-in) is read with O_DIRECT and returns its bytes."""
    data = _image(tmp_path / "img", 4 * MiB)
    proc = subprocess.run(["losetup", "--find", "--show", "--read-only", str(tmp_path / "img")],
                          capture_output=True, text=True, check=True)
    dev = proc.stdout.strip()
    try:
        with RawSource(dev) as src:
            got = b"".join(src.read_sequence(iter([(0, 2 * MiB), (2 * MiB, 2 * MiB)])))
        assert got == data
    finally:
        subprocess.run(["losetup", "--detach", dev], check=True)
