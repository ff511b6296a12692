"""Choosing a reader for a source by its content (or by ``--format``)."""

from __future__ import annotations

import os

from ingest.raw import RawSource, open_readonly
from ingest.source import DiskSource
from repofs.errors import SourceError

#: Formats ``--format`` accepts.  Readers register in :data:`READERS`.
FORMATS = ("raw", "vmdk")


def detect_format(path: str, head: bytes) -> str:
    """Name the format of ``path`` from its first bytes; ``raw`` when nothing matches."""
    from ingest.vmdk import looks_like_vmdk

    if looks_like_vmdk(head):
        return "vmdk"
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
    chosen = fmt or detect_format(path, head)
    if chosen == "raw":
        return RawSource(path, fd)
    if chosen == "vmdk":
        from ingest.vmdk import open_vmdk

        return open_vmdk(path, fd)
    os.close(fd)
    raise SourceError(f"{path}: no reader for format {chosen!r}")
