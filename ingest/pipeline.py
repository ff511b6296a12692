"""The ingest pipeline: source -> chunks -> hash, dedup, compress -> packs -> restore point.

One thread reads the source sequentially; a pool of worker threads hashes
and compresses (blake3 and zstd release the GIL, so this scales with
cores); the same reading thread consumes results in disk order, appends new
chunks to packs and streams the map.  The number of batches in flight is
bounded, so memory stays flat whatever the disk size.
"""

from __future__ import annotations

import collections
import contextlib
import os
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from ingest.cbt.blocks import ChangedBlocks, sample_unchanged_chunks
from ingest.formats.raw import read_small_file
from ingest.formats.source import DiskSource, Extent, clip_extents
from ingest.inherit import PageMemo, check_inherited, whole_inherited_bytes
from ingest.plan import Interval, Run, chunk_intervals, complement, intersect, plan_runs, union
from repofs.errors import IntegrityError, SourceError, UsageError
from repofs.store.maps import MapBuilder, MapReader
from repofs.store.names import validate_restore_point_names, validate_vm_name
from repofs.store.records import ZERO_DIGEST, Codec, Compressor, RecordType
from repofs.store.repository import Repository
from repofs.store.restorepoint import ConfigFile, DiskInfo, RestorePoint
from repofs.store.writer import ObjectWriter
from repofs.util.progress import Progress

BATCH_BYTES = 4 * 1024 * 1024
MAX_CONFIG_BYTES = 64 * 1024 * 1024
INGEST_INDEX_WARM_BYTES = 128 * 1024 * 1024  # about 600,000 objects (40 GB of unique data)


@dataclass
class DiskRequest:
    """One ``DISK=SOURCE`` of an ingest, with its changed-block extents if any.

    ``position`` is the changed-block tracking position the source was
    taken at (``--cbt-position``), recorded for the next incremental.
    """

    name: str
    source: DiskSource
    changed: list[Extent] | None = None
    position: str | None = None


@dataclass
class DiskPlan:
    """How one disk is ingested: its runs, and what the parent could not supply."""

    n_chunks: int
    runs: list[tuple[Run, int, int]]
    mode: str  #: ``full``, ``dedup`` or ``cbt``, as :class:`DiskInfo` records it
    healed: list[Interval]  #: inherited chunks the repository lacked, read from the source
    healed_bytes: int  #: what of ``healed`` is read (its allocated part)
    inherited_bytes: int  #: allocated bytes of the chunks taken from the parent


# A worker's verdict on one chunk: zero, known (digest only), or new (with payload).
ChunkResult = tuple[bytes, Codec | None, int, bytes | None]


class _Workers:
    """Hash, zero-check and compress batches in a thread pool."""

    def __init__(self, repo: Repository, threads: int) -> None:
        self._repo = repo
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="repofs-hash")
        self._local = threading.local()
        self._zero = bytes(repo.config.chunk_size)
        self.threads = threads

    def _compressor(self) -> Compressor:
        comp = getattr(self._local, "compressor", None)
        if comp is None:
            cfg = self._repo.config
            comp = self._local.compressor = Compressor(cfg.codec, cfg.level)
        return comp

    def _process(self, data: bytes, chunk_size: int) -> list[ChunkResult]:
        out: list[ChunkResult] = []
        index = self._repo.index
        comp = self._compressor()
        keys = self._repo.keys  # names and seals here, in parallel, not on the writer's thread
        with index.reading() as txn:  # holds off a map resize while it reads
            for pos in range(0, len(data), chunk_size):
                piece = data[
                    pos : pos + chunk_size
                ]  # a copy, but memcmp-fast, unlike memoryview ==
                n = len(piece)
                if piece == (self._zero if n == chunk_size else self._zero[:n]):
                    out.append((ZERO_DIGEST, None, n, None))
                    continue
                digest = keys.name(piece)
                if index.has(txn, RecordType.CHUNK, digest):
                    out.append((digest, None, n, None))
                    continue
                codec, payload = comp.compress(piece)
                out.append((digest, codec, n, keys.seal(RecordType.CHUNK, digest, payload)))
        return out

    def submit(self, data: bytes, chunk_size: int) -> Future[list[ChunkResult]]:
        return self._pool.submit(self._process, data, chunk_size)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def chunk_length(i: int, chunk_size: int, capacity: int) -> int:
    return min(chunk_size, capacity - i * chunk_size)


def _forced_changes(
    capacity: int, parent: DiskInfo, chunk_size: int, n: int
) -> list[tuple[int, int]]:
    """Chunks a parent cannot supply: beyond its end, or of a different length than ours."""
    forced = []
    first_bad = min(parent.n_chunks, n)
    # The parent's last chunk is partial, or ours is: those lengths differ.
    for i in {parent.n_chunks - 1, n - 1}:
        if 0 <= i < min(parent.n_chunks, n) and (
            chunk_length(i, chunk_size, parent.capacity) != chunk_length(i, chunk_size, capacity)
        ):
            first_bad = min(first_bad, i)
    if first_bad < n:
        forced.append((first_bad, n))
    return forced


def _copy_parent(builder: MapBuilder, preader: MapReader, start: int, count: int) -> None:
    """Take ``count`` references from the parent map, whole pages or subtrees where aligned."""
    pn = preader.root.n_chunks
    page_refs = builder.page_refs
    pos = start
    end = start + count
    while pos < end:
        level = builder.largest_subtree(end - pos)
        while level >= 0:
            span = page_refs ** (level + 1)
            if (
                level <= preader.root.depth - 1
                and (pos // span + 1) * span <= pn
                and (level < preader.root.depth - 1 or pos == 0)
            ):
                break
            level -= 1
        if level >= 0:
            builder.add_subtree(level, preader.subtree_ref(level, pos // page_refs ** (level + 1)))
            pos += page_refs ** (level + 1)
        else:
            step = min(end - pos, page_refs - pos % page_refs)
            builder.extend(preader.refs(pos, step))
            pos += step


class Ingest:
    """One ingest of one VM's disks into one restore point."""

    def __init__(
        self,
        repo: Repository,
        vm: str,
        disks: list[DiskRequest],
        configs: list[str],
        *,
        parent: RestorePoint | None,
        progress: bool | None = None,
        threads: int | None = None,
        consistency: str = "crash",
        note: str | None = None,
    ) -> None:
        self.repo = repo
        self.consistency = consistency  #: stored in the record: see RestorePoint.consistency
        self.note = note
        self.vm = validate_vm_name(vm, new=True)
        self.disks = disks
        self.configs = configs
        self.parent = parent
        self.progress_enabled = progress
        self.threads = threads or max(1, os.cpu_count() or 1)
        if not disks:
            raise UsageError("no disks given: name at least one DISK=SOURCE")
        validate_restore_point_names([d.name for d in disks], configs)
        for d in disks:
            if d.changed is not None and parent is None:
                raise UsageError(
                    f"disk {d.name}: a changed-block list needs a parent restore point, "
                    f"and VM {vm!r} has none"
                )

    # -- planning -----------------------------------------------------------------

    def _changed(self, d: DiskRequest) -> list[Interval] | None:
        """Chunks a CBT incremental reads: the list's and those the parent's shape cannot give.

        None when the disk is read whole (no list, or no such disk in the parent).
        """
        parent_disk = self.parent.disk(d.name) if self.parent else None
        if d.changed is None or parent_disk is None:
            return None
        cs = self.repo.config.chunk_size
        capacity = d.source.size
        n = -(-capacity // cs)
        changed = chunk_intervals(sorted(d.changed), cs, n)
        return union(changed, _forced_changes(capacity, parent_disk, cs, n))

    def _plan(self, d: DiskRequest, memo: PageMemo) -> DiskPlan:
        cs = self.repo.config.chunk_size
        capacity = d.source.size
        n = -(-capacity // cs)
        parent_disk = self.parent.disk(d.name) if self.parent else None
        changed = self._changed(d)
        healed: list[Interval] = []
        inherited_bytes = 0
        if changed is not None and parent_disk is not None:
            inherited = complement(changed, n)
            assert self.parent is not None
            if self.parent.seq in memo.whole:
                inherited_bytes = whole_inherited_bytes(self.repo, parent_disk, inherited)
            else:
                # Whatever the parent lost since it was taken must not be inherited: read it.
                found = check_inherited(self.repo, parent_disk, inherited, memo)
                healed, inherited_bytes = found.missing, found.nonzero_bytes
                changed = union(changed, healed)
            # Only changed chunks are read, so only their allocation matters.
            extents = d.source.allocated_within((a * cs, (b - a) * cs) for a, b in changed)
            mode = "cbt"
        else:
            extents = d.source.allocated_extents()
            mode = "dedup" if parent_disk is not None else "full"
        allocated = chunk_intervals(clip_extents(extents, capacity), cs, n)
        healed_bytes = sum(
            min(b * cs, capacity) - a * cs
            for a, b in intersect(intersect(healed, allocated), [(0, n)])
        )
        runs = list(plan_runs(n, allocated, changed))
        return DiskPlan(n, runs, mode, healed, healed_bytes, inherited_bytes)

    # -- CBT sanity check -----------------------------------------------------------

    def check_cbt(self, samples: int, seed: int | None = None) -> None:
        """Compare ``samples`` chunks the list calls unchanged with the parent; fail if one differs.

        CBT bugs (VMware's after a disk grew is the famous one) silently
        corrupt every later backup; a few sampled reads catch them.  The
        sample is drawn by :func:`~ingest.cbt.blocks.sample_unchanged_chunks` over
        the chunks the ingest would take from the parent (the list's
        unchanged chunks less those a grown or shrunk disk reads anyway).
        A sampled chunk whose parent page the repository lost is skipped:
        the ingest reads that range from the source in any case.
        """
        if samples <= 0 or self.parent is None:
            return
        import random  # only for --cbt-check: not on every ingest's start-up

        rng = random.Random(seed)
        cs = self.repo.config.chunk_size
        for d in self.disks:
            pdisk = self.parent.disk(d.name)
            changed = self._changed(d)
            if changed is None or pdisk is None:
                continue
            capacity = d.source.size
            read = ChangedBlocks.from_chunk_ranges(capacity, changed, cs)
            picks = sample_unchanged_chunks(read, cs, capacity, samples, rng)
            preader = self.repo.map_reader(pdisk)
            bad: list[tuple[int, int]] = []
            for i in picks:
                try:
                    parent_ref = preader.ref_at(i)
                except IntegrityError:
                    continue
                length = chunk_length(i, cs, capacity)
                data = d.source.read(i * cs, length)
                ref = ZERO_DIGEST if data == bytes(length) else self.repo.keys.name(data)
                if ref != parent_ref:
                    if bad and bad[-1][1] == i * cs:  # one range for neighbouring chunks
                        bad[-1] = (bad[-1][0], i * cs + length)
                    else:
                        bad.append((i * cs, i * cs + length))
            if bad:
                ranges = ", ".join(f"{a}-{b}" for a, b in bad[:5])
                more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
                raise SourceError(
                    f"--cbt-check failed: disk {d.name}: bytes {ranges}{more} differ from parent "
                    f"{self.parent.id} although the changed-block list says unchanged; "
                    "the changed-block tracking is wrong, take a full backup"
                )

    # -- running ------------------------------------------------------------------

    def run(self, now: float | None = None) -> RestorePoint:
        repo = self.repo
        # Every new chunk is looked up in the index and an incremental walks its parent's
        # map: with a cold cache each lookup waited for B-tree pages from disk, most of
        # an incremental's time.  A small index is cheaper read whole, in the background.
        repo.index.warm(INGEST_INDEX_WARM_BYTES)
        memo = PageMemo()
        if self.parent is not None and repo.known_whole(self.parent):
            memo.whole.add(self.parent.seq)
        plans = [self._plan(d, memo) for d in self.disks]
        for d, plan in zip(self.disks, plans, strict=True):
            if plan.healed:
                assert self.parent is not None
                print(
                    f"repofs: disk {d.name}: {plan.healed_bytes / (1 << 20):.1f} MiB the parent "
                    f"{self.parent.id} lacked were read from the source",
                    file=sys.stderr,
                    flush=True,
                )
        total = sum(
            count * repo.config.chunk_size
            for plan in plans
            for kind, _s, count in plan.runs
            if kind is Run.READ
        )
        progress = Progress(total, enabled=self.progress_enabled)
        config_blobs = self._read_configs()
        res = repo.reserve(self.vm, now, parent=self.parent.id if self.parent else None)
        writer = repo.writer()
        workers = _Workers(repo, self.threads)
        try:
            disks = [
                self._ingest_disk(d, plan, writer, workers, progress)
                for d, plan in zip(self.disks, plans, strict=True)
            ]
            configs = [
                ConfigFile(name, writer.put_raw(RecordType.BLOB, data).hex(), len(data))
                for name, data in config_blobs
            ]
            rp = RestorePoint(
                vm=self.vm,
                id=res.rp_id,
                seq=res.seq,
                vm_seq=res.vm_seq,
                created=res.created,
                chunk_size=repo.config.chunk_size,
                parent=self.parent.id if self.parent else None,
                disks=disks,
                configs=configs,
                consistency=self.consistency,
                note=self.note,
            )
            repo.commit(writer, rp, since_gen=res.gen)
        except BaseException:
            writer.abort()
            with contextlib.suppress(Exception):  # the original error matters more
                repo.release(res)
            raise
        finally:
            workers.close()
            progress.finish()
        return rp

    def _read_configs(self) -> list[tuple[str, bytes]]:
        out = []
        for path in self.configs:
            try:
                data = read_small_file(path, MAX_CONFIG_BYTES, "config file")
            except SourceError as exc:  # a --config is part of the command line
                raise UsageError(str(exc)) from None
            out.append((os.path.basename(path), data))
        return out

    def _ingest_disk(
        self,
        d: DiskRequest,
        plan: DiskPlan,
        writer: ObjectWriter,
        workers: _Workers,
        progress: Progress,
    ) -> DiskInfo:
        repo = self.repo
        cs = repo.config.chunk_size
        capacity = d.source.size
        n, runs, mode = plan.n_chunks, plan.runs, plan.mode
        builder = MapBuilder(
            n, repo.config.page_refs, lambda raw: writer.put_raw(RecordType.PAGE, raw)
        )
        pdisk = self.parent.disk(d.name) if self.parent else None
        preader = repo.map_reader(pdisk) if (pdisk is not None and mode == "cbt") else None
        # allocated = what we take from the parent, plus what we produce
        stats = {"read": 0, "new": 0, "chunks": 0, "allocated": plan.inherited_bytes}

        queue: collections.deque[Callable[[], None] | tuple[Future[list[ChunkResult]], int]] = (
            collections.deque()
        )
        # Bytes read but not yet consumed, not queue items: a CBT plan alternates
        # tiny reads with parent runs, and counting items kept only a few chunks
        # in flight, starving the workers.
        budget = (workers.threads * 2 + 2) * BATCH_BYTES
        inflight = 0

        def consume(results: list[ChunkResult]) -> None:
            for digest, codec, raw_len, payload in results:
                if digest != ZERO_DIGEST:
                    stats["allocated"] += raw_len
                    if payload is not None and (RecordType.CHUNK, digest) not in writer.pending:
                        assert codec is not None
                        writer.put(RecordType.CHUNK, digest, codec, raw_len, payload)
                        stats["new"] += len(payload)
                builder.add(digest)

        def drain(keep_bytes: int) -> None:
            """Consume queued work in order until at most ``keep_bytes`` are in flight.

            A negative ``keep_bytes`` consumes everything, the parent and zero
            runs queued after the last read included (they carry no bytes).
            """
            nonlocal inflight
            while queue and (inflight > keep_bytes or keep_bytes < 0):
                item = queue.popleft()
                if callable(item):
                    item()
                else:
                    fut, nbytes = item
                    consume(fut.result())
                    inflight -= nbytes
                    progress.update(nbytes)

        per_batch = max(1, BATCH_BYTES // cs)

        def ranges() -> Iterator[Extent]:
            """Every read of the loop below, in its order, for the source to fetch ahead."""
            for kind, start, count in runs:
                if kind is Run.READ:
                    for first in range(start, start + count, per_batch):
                        k = min(per_batch, start + count - first)
                        yield first * cs, min(k * cs, capacity - first * cs)

        reads = d.source.read_sequence(ranges())
        try:
            for kind, start, count in runs:
                if kind is Run.ZERO:
                    queue.append(lambda c=count: builder.add_zeros(c))
                elif kind is Run.PARENT:
                    assert preader is not None
                    queue.append(lambda s=start, c=count: _copy_parent(builder, preader, s, c))
                else:
                    for first in range(start, start + count, per_batch):
                        k = min(per_batch, start + count - first)
                        data = next(reads)
                        stats["read"] += len(data)
                        stats["chunks"] += k
                        queue.append((workers.submit(data, cs), len(data)))
                        inflight += len(data)
                        drain(budget)
            drain(-1)
        finally:
            close = getattr(reads, "close", None)
            if close is not None:
                close()
        root = builder.finish()
        return DiskInfo(
            name=d.name,
            capacity=capacity,
            map_root=root.root.hex(),
            map_depth=root.depth,
            n_chunks=root.n_chunks,
            allocated_bytes=stats["allocated"],
            source_format=d.source.format_name,
            source_chain=[os.path.abspath(p) for p in d.source.chain()],
            read_mode=mode,
            bytes_read=stats["read"],
            bytes_new=stats["new"],
            chunks_read=stats["chunks"],
            cbt_position=d.position,
        )
