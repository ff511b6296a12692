"""Appending new objects to packs and indexing them once they are durable."""

from __future__ import annotations

import threading

from repofs.index import Index, Location
from repofs.packstore import PackSink, PackStore
from repofs.records import Codec, Compressor, RecordType, digest_of, encode_header, pack_header


class ObjectWriter:
    """Writes objects into packs for one ingest (or one gc repack).

    An object is indexed only after the pack holding it is published, so the
    index never points at data that a crash could lose.  Objects in the pack
    still being written are remembered in :attr:`pending` so the same ingest
    deduplicates against them.  Only one thread calls the writing methods.
    """

    def __init__(
        self,
        index: Index,
        packs: PackStore,
        repository_id: str,
        target_size: int,
        compression: tuple[str, int],
    ) -> None:
        self._index = index
        self._packs = packs
        self._repository_id = repository_id
        self._target = target_size
        self._compressor = Compressor(*compression)
        self._sink: PackSink | None = None
        self._entries: list[tuple[RecordType, bytes, int, int, int]] = []
        self.pending: set[tuple[RecordType, bytes]] = set()
        self.bytes_stored = 0
        self.objects_stored = 0
        self.packs_published: list[bytes] = []
        self._lock = threading.Lock()

    def known(self, rtype: RecordType, digest: bytes) -> bool:
        """True if the object is stored or about to be: no need to write it again."""
        if (rtype, digest) in self.pending:
            return True
        return self._index.read(lambda txn: self._index.has(txn, rtype, digest))

    def put(
        self, rtype: RecordType, digest: bytes, codec: Codec, raw_len: int, payload: bytes
    ) -> Location:
        """Append a record whose payload the caller already compressed; returns where it went."""
        if self._sink is None:
            self._sink = self._packs.create()
            self._sink.append(pack_header(self._repository_id))
        header = encode_header(rtype, codec, len(payload), raw_len, digest)
        offset = self._sink.append(header + payload)
        self._entries.append((rtype, digest, offset, len(payload), raw_len))
        self.pending.add((rtype, digest))
        self.bytes_stored += len(header) + len(payload)
        self.objects_stored += 1
        loc = Location(self._sink.pack_id, offset, len(payload), raw_len)
        if self._sink.size >= self._target:
            self.flush()
        return loc

    def put_raw(self, rtype: RecordType, raw: bytes, *, dedup: bool = True) -> bytes:
        """Compress and store ``raw`` unless an identical object exists; returns its digest."""
        digest = digest_of(raw)
        if dedup and self.known(rtype, digest):
            return digest
        return self.put_new(rtype, raw, digest)[0]

    def put_new(
        self, rtype: RecordType, raw: bytes, digest: bytes | None = None
    ) -> tuple[bytes, Location]:
        """Compress and append ``raw`` unconditionally; returns its digest and location."""
        digest = digest_of(raw) if digest is None else digest
        codec, payload = self._compressor.compress(raw)
        return digest, self.put(rtype, digest, codec, len(raw), payload)

    def flush(self) -> bytes | None:
        """Publish the current pack (durable), then index its objects in one transaction."""
        sink, entries = self._sink, self._entries
        if sink is None:
            return None
        self._sink, self._entries = None, []
        sink.publish()
        self._index.write(lambda txn: self._index.add_pack(txn, sink.pack_id, sink.size, entries))
        self.pending.clear()
        self.packs_published.append(sink.pack_id)
        return sink.pack_id

    def abort(self) -> None:
        """Throw away the unpublished pack; published ones become garbage for gc."""
        if self._sink is not None:
            self._sink.abort()
            self._sink = None
            self._entries = []
            self.pending.clear()
