"""Packs as objects in a bucket: one PUT per pack, ranged GETs to read.

A pack is filled in memory and uploaded whole when the writer publishes it
(32 MiB by default, ``init --pack-size``: one PUT per 32 MiB of new data).
The writer publishes on a pool of threads, so uploads overlap each other
and the hashing and compression of the next pack.  PUT is atomic:
a reader never sees part of a pack, and a writer killed during an upload
leaves nothing, or a whole pack that no commit names (gc's leftovers).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

from repofs.errors import IntegrityError
from repofs.store.bucket import Bucket, ObjectMissing
from repofs.store.packstore import PackSink, PackStore, new_pack_id

PACKS_PREFIX = "packs/"


def _knob(name: str, default: int) -> int:
    try:
        return max(1, int(os.environ.get(name, "")))
    except ValueError:
        return default


#: Readers' knobs for a bucket (see :class:`PackStore`); the environment overrides
#: them for benchmarks and for stores whose round trip is far from a LAN's.
S3_READ_GAP = _knob("REPOFS_S3_READ_GAP", 256 * 1024)
S3_READ_RUN = _knob("REPOFS_S3_READ_RUN", 4 * 1024 * 1024)
S3_READ_THREADS = _knob("REPOFS_S3_READ_THREADS", 24)
S3_READ_AHEAD = _knob("REPOFS_S3_READ_AHEAD", 64 * 1024 * 1024)


def pack_name(pack_id: bytes) -> str:
    h = pack_id.hex()
    return f"{PACKS_PREFIX}{h[:2]}/{h}.pack"


def parse_pack_name(name: str) -> bytes | None:
    """The pack id of a ``packs/XX/<32 hex>.pack`` name, or None for anything else."""
    if not name.startswith(PACKS_PREFIX) or not name.endswith(".pack"):
        return None
    stem = name[len(PACKS_PREFIX) :]
    sub, _, file = stem.partition("/")
    if len(sub) != 2 or len(file) != 37 or not file.startswith(sub):
        return None
    try:
        return bytes.fromhex(file[:32])
    except ValueError:
        return None


class _BucketSink(PackSink):
    def __init__(self, store: S3PackStore) -> None:
        self.pack_id = new_pack_id()
        self._store = store
        self._buf = bytearray()

    @property
    def size(self) -> int:
        return len(self._buf)

    def append(self, data: bytes) -> int:
        offset = len(self._buf)
        self._buf += data
        return offset

    def publish(self) -> None:
        # The buffer itself, not a bytes() copy of it: 32 MiB less copying per pack, and
        # nothing appends to it until the PUT has returned.
        self._store.bucket.put(pack_name(self.pack_id), self._buf)
        self._buf = bytearray()

    def abort(self) -> None:
        self._buf = bytearray()


class S3PackStore(PackStore):
    """The packs of a repository in a bucket."""

    READ_GAP = S3_READ_GAP
    READ_RUN = S3_READ_RUN
    READ_THREADS = S3_READ_THREADS
    READ_AHEAD = S3_READ_AHEAD
    REMOTE = True

    def __init__(self, bucket: Bucket) -> None:
        self.bucket = bucket

    def create(self) -> PackSink:
        return _BucketSink(self)

    def read(self, pack_id: bytes, offset: int, length: int) -> bytes:
        try:
            return self.bucket.get(pack_name(pack_id), offset, length)
        except ObjectMissing:
            raise IntegrityError(f"pack {pack_id.hex()} is missing") from None

    def size(self, pack_id: bytes) -> int:
        size = self.bucket.head(pack_name(pack_id))
        if size is None:
            raise IntegrityError(f"pack {pack_id.hex()} is missing")
        return size

    def list(self) -> Iterator[bytes]:
        for info in self.bucket.list(PACKS_PREFIX):
            pack_id = parse_pack_name(info.name)
            if pack_id is not None:
                yield pack_id

    def list_sized(self) -> Iterator[tuple[bytes, int, float]]:
        """Every pack with its size and LastModified (gc's leftovers, verify's cheap mode)."""
        for info in self.bucket.list(PACKS_PREFIX):
            pack_id = parse_pack_name(info.name)
            if pack_id is not None:
                yield pack_id, info.size, info.mtime

    def delete(self, pack_id: bytes) -> None:
        self.bucket.delete(pack_name(pack_id))

    def forget(self, pack_id: bytes) -> None:
        """Nothing is held open per pack."""

    def cleanup_unpublished(self, running: Callable[[int], bool] | None = None) -> int:
        return 0  # an unfinished pack never reached the bucket

    def close(self) -> None:
        """Connections belong to the bucket's client, which lives as long as the process."""
