"""Appending new objects to packs and indexing them once they are durable."""

from __future__ import annotations

import collections
import contextlib
import threading
from concurrent.futures import Future, ThreadPoolExecutor

from repofs.errors import RepositoryError
from repofs.store.crypto import PLAIN, Keys
from repofs.store.index import Index, Location
from repofs.store.packstore import PackSink, PackStore
from repofs.store.records import (
    Codec,
    Compressor,
    RecordType,
    encode_header,
    pack_header,
)

Entry = tuple[RecordType, bytes, int, int, int]  # type, digest, offset, stored, raw length


class ObjectWriter:
    """Writes objects into packs for one ingest (or one gc repack).

    An object is indexed only after the pack holding it is published, so the
    index never points at data that a crash could lose.  Objects in packs not
    indexed yet are remembered in :attr:`pending` so the same ingest
    deduplicates against them.  Only one thread calls the writing methods.

    A full pack is published (fsync, rename, index) on a background thread
    while the next one fills: publishing a 32 MiB pack waits on the disk,
    and doing it inline stalled ingest for a third of its time.
    :meth:`flush` waits for every publication, so its promise is unchanged.
    """

    MAX_PUBLISHING = 2  # full packs waiting for the disk before put() waits too
    PUBLISHERS = 1  #: threads publishing packs (one: a local disk gains nothing from more)

    def __init__(
        self,
        index: Index,
        packs: PackStore,
        repository_id: str,
        target_size: int,
        compression: tuple[str, int],
        keys: Keys = PLAIN,
    ) -> None:
        self._index = index
        self.keys = keys
        self._packs = packs
        self._repository_id = repository_id
        self._target = target_size
        self._compressor = Compressor(*compression)
        self._sink: PackSink | None = None
        self._entries: list[Entry] = []
        self.pending: set[tuple[RecordType, bytes]] = set()
        self.bytes_stored = 0
        self.objects_stored = 0
        self.packs_published: list[bytes] = []
        self._lock = threading.Lock()
        self._publisher: ThreadPoolExecutor | None = None
        self._publishing: collections.deque[tuple[Future[bytes], list[Entry]]] = collections.deque()
        self._failed = False  # a publication failed: publish nothing after it

    def known(self, rtype: RecordType, digest: bytes) -> bool:
        """True if the object is stored or about to be: no need to write it again."""
        if (rtype, digest) in self.pending:
            return True
        return self._index.read(lambda txn: self._index.has(txn, rtype, digest))

    def put(
        self, rtype: RecordType, digest: bytes, codec: Codec, raw_len: int, payload: bytes
    ) -> Location:
        """Append a record whose payload the caller already compressed and sealed.

        ``payload`` is what the pack stores (:meth:`Keys.seal` of the
        compressed bytes), so gc can copy a record verbatim; ``raw_len`` is
        the plaintext's length.  Returns where it went.
        """
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
            self._rotate()
        return loc

    def put_raw(self, rtype: RecordType, raw: bytes, *, dedup: bool = True) -> bytes:
        """Compress and store ``raw`` unless an identical object exists; returns its digest."""
        digest = self.keys.name(raw)
        if dedup and self.known(rtype, digest):
            return digest
        return self.put_new(rtype, raw, digest)[0]

    def put_new(
        self, rtype: RecordType, raw: bytes, digest: bytes | None = None
    ) -> tuple[bytes, Location]:
        """Compress, seal and append ``raw`` unconditionally; returns its digest and location."""
        digest = self.keys.name(raw) if digest is None else digest
        codec, payload = self._compressor.compress(raw)
        payload = self.keys.seal(rtype, digest, payload)
        return digest, self.put(rtype, digest, codec, len(raw), payload)

    def _rotate(self) -> None:
        """Hand the current pack to the publisher thread; wait only if too many are queued."""
        sink, entries = self._sink, self._entries
        if sink is None:
            return
        self._sink, self._entries = None, []
        if self._publisher is None:
            self._publisher = ThreadPoolExecutor(
                self.PUBLISHERS, thread_name_prefix="repofs-publish"
            )
        self._publishing.append((self._publisher.submit(self._publish, sink, entries), entries))
        self._reap(self.MAX_PUBLISHING)

    def _publish(self, sink: PackSink, entries: list[Entry]) -> bytes:
        """Publish, then index; a pack that cannot be indexed is deleted again.

        Nothing can refer to a pack the index does not know, so deleting it
        is safe, and leaving it would be worse than untidy: if it holds a
        restore point record, the failed ingest gives back its reservation,
        and gc then takes the record for a committed restore point that the
        index lost (it refuses to run until a rebuild-index, which would
        bring the failed restore point back).
        """
        if self._failed:
            # Never publish past a pack that failed: the restore point record goes into the
            # last pack (see Repository.commit), and must not outlive data that was lost.
            sink.abort()
            raise RepositoryError(f"pack {sink.pack_id.hex()} not published: an earlier one failed")
        try:
            size = sink.size
            sink.publish()
            try:
                self._index_pack(sink.pack_id, size, entries)
            except BaseException:
                with contextlib.suppress(Exception):  # the indexing error is the one to report
                    self._packs.delete(sink.pack_id)
                raise
        except BaseException:
            self._failed = True
            raise
        return sink.pack_id

    def _index_pack(self, pack_id: bytes, size: int, entries: list[Entry]) -> None:
        """Make a published pack's objects known: here, in the index at once."""
        self._index.write(lambda txn: self._index.add_pack(txn, pack_id, size, entries))

    def _published(self, entries: list[Entry]) -> None:
        """A pack's objects are indexed now: the in-memory reminder can go."""
        self.pending.difference_update((e[0], e[1]) for e in entries)

    def _reap(self, keep: int) -> None:
        """Collect finished publications, waiting until at most ``keep`` remain; re-raise errors."""
        while self._publishing and (len(self._publishing) > keep or self._publishing[0][0].done()):
            fut, entries = self._publishing[0]
            pack_id = fut.result()
            self._publishing.popleft()
            self.packs_published.append(pack_id)
            self._published(entries)

    def flush(self) -> bytes | None:
        """Publish the current pack (durable), index its objects, and wait for all earlier ones.

        Returns the id of the last pack this call published, or None.
        """
        before = len(self.packs_published)
        self._rotate()
        self._reap(0)
        self.close()
        return self.packs_published[-1] if len(self.packs_published) > before else None

    def close(self) -> None:
        """Stop the publisher thread (after :meth:`flush` or :meth:`abort`)."""
        if self._publisher is not None:
            self._publisher.shutdown(wait=True)
            self._publisher = None

    def abort(self) -> None:
        """Throw away the unpublished pack; published ones become garbage for gc."""
        while self._publishing:  # let each finish: it either publishes or cleans up
            fut, _entries = self._publishing.popleft()
            if fut.exception() is None:
                self.packs_published.append(fut.result())
        if self._sink is not None:
            self._sink.abort()
            self._sink = None
            self._entries = []
        self.pending.clear()
        self._failed = False
        self.close()
