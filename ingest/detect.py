"""Choosing a reader for a source by its content (or by ``--format``)."""

from __future__ import annotations

import os

from ingest.raw import RawSource, open_readonly
from ingest.source import DiskSource
from repofs.errors import SourceError

#: Formats ``--format`` accepts.  Readers register in :data:`READERS`.
FORMATS = ("raw", "qcow2", "vhd", "vhdx")


def detect_format(path: str, head: bytes) -> str:
    """Name the format of ``path`` from its first bytes; ``raw`` when nothing matches."""
    if head[:4] == b"QFI\xfb":
        return "qcow2"
    if head[:8] == b"vhdxfile":
        return "vhdx"
    if head[:8] == b"conectix":  # dynamic/differencing VHD: footer copy at offset 0
        return "vhd"
    from ingest.vhd import has_fixed_footer

    if has_fixed_footer(path):  # fixed VHD: raw data followed by a 512-byte footer
        return "vhd"
    return "raw"


def open_source(path: str, fmt: str | None = None) -> DiskSource:
    """Open ``path`` with the reader for ``fmt`` or for the format its content shows."""
    if fmt is not None and fmt not in FORMATS:
        raise SourceError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    fd = open_readonly(path)
    try:
        head = os.pread(fd, 4096, 0)
    except OSError as exc:
        os.close(fd)
        raise SourceError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        chosen = fmt or detect_format(path, head)
    except BaseException:
        os.close(fd)
        raise
    if chosen == "raw":
        return RawSource(path, fd)
    if chosen == "qcow2":
        from ingest.qcow2 import Qcow2Source

        return Qcow2Source(path, fd)
    if chosen == "vhd":
        from ingest.vhd import VhdSource

        return VhdSource(path, fd)
    if chosen == "vhdx":
        from ingest.vhdx import VhdxSource

        return VhdxSource(path, fd)
    os.close(fd)
    raise SourceError(f"{path}: no reader for format {chosen!r}")
