"""``repofs verify``: one check per invariant, and every problem mapped to the bytes it harms.

The checks, in the order they run:

1. the config file parses and is of a supported version (on open);
2. the index opens and reads; if it does not, the packs are scanned to name
   the restore points that cannot be read until ``rebuild-index``;
3. every restore point has its own record in a pack (else rebuild-index
   could not restore it), its config blobs are indexed, and every map page
   it references exists, hashes correctly and has the length its position
   demands; every chunk a page references is indexed with the right length.
   Shared pages are visited once;
4. every pack the index names exists, has this repository's header and is
   at least as long as the index says;
5. every indexed object (or those of ``--vm``, or a ``--sample`` of the
   chunks) is re-read and re-hashed.  Objects are sorted by pack and offset
   and read in large sequential windows by one thread, with ``O_DIRECT``
   into a few reused buffers (:class:`PackReader`); decompression and
   hashing run straight from those buffers on every core, one window per
   task (:func:`_check_window`), so verify reads each pack once, front to
   back, at the disk's speed or the cores' (zstd and BLAKE3), whichever is
   lower;
6. leftovers (packs the index does not know, unfinished packs) and files
   that others than the owner may read are reported as warnings.

Each problem then lists the restore points, disks and byte ranges it
affects: bad chunks and pages are mapped back through every map that
references them (memoised per page).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import itertools
import json
import mmap
import os
import queue
import random
import stat
import struct
import threading
import time
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import NamedTuple

import blake3
import lmdb
import zstandard

from ingest.progress import Progress
from repofs.config import RepoConfig
from repofs.crypto import PLAIN, Keys
from repofs.directio import ALIGN, HUGE_PAGE, direct_buffer, read_into
from repofs.errors import IndexAccessError, IntegrityError, RepositoryError, UsageError
from repofs.gc import unindexed_packs, unlisted_restore_points
from repofs.index import LOCATION, PACK_INFO, Location
from repofs.mapwalk import DamageMapper, MapWalker, byte_ranges
from repofs.names import validate_vm_name
from repofs.packscan import scan_pack
from repofs.packstore import LocalPackStore, PackStore
from repofs.records import (
    PACK_HEADER,
    RECORD_HEADER,
    RECORD_HEADER_SIZE,
    RECORD_MAGIC,
    ZERO_DIGEST,
    Codec,
    RecordType,
    check_pack_header,
    decode_header,
    thread_decompressor,
)
from repofs.repository import NEW_INDEX_DIR, PACKS_DIR, Repository, open_keys
from repofs.restorepoint import RestorePoint
from repofs.rprecords import parse_rp_record, parse_tombstone, rp_record_digest

WINDOW = 8 * 1024 * 1024  # one sequential read
GAP = 1024 * 1024  # read through holes smaller than this rather than seek
MAX_RANGES_SHOWN = 8
_RAW_LEN = struct.Struct(">I")  # the last field of index.LOCATION
assert LOCATION.size == 32 and LOCATION.format.endswith("I")
INDEX_DAMAGE = (lmdb.Error, json.JSONDecodeError, struct.error, UnicodeDecodeError)


@dataclass
class Problem:
    """Something stored that is missing or wrong, and what it harms."""

    subject: str
    message: str
    affects: list[str] = field(default_factory=list)


@dataclass
class VerifyResult:
    problems: list[Problem] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    vms: int = 0
    restore_points: int = 0
    pages: int = 0
    objects_checked: int = 0
    bytes_checked: int = 0
    elapsed: float = 0.0
    sample: float | None = None

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, object]:
        """``verify --json``: every field, and ``ok``."""
        return {"ok": self.ok, **asdict(self)}


class _Entry(NamedTuple):
    """One object to re-read.  A tuple, so that sorting by pack and offset runs in C."""

    pack_id: bytes
    offset: int
    stored_len: int
    raw_len: int
    rtype: int  # a RecordType; kept a plain int in the hot loop
    digest: bytes


@dataclass(slots=True)
class _Window:
    """One sequential read: block-aligned ``start``, and the records lying wholly inside it."""

    pack_id: bytes
    start: int
    length: int
    entries: list[_Entry]
    nbytes: int  # record bytes in it, for the counters and the progress line


_Buffer = mmap.mmap | bytes  # what a window is read into
#: the failures of one window, ``(entry, message)``; records that checked out are not listed
_Failures = list[tuple[_Entry, str]]


def verify_repository(
    path: str,
    *,
    vm: str | None = None,
    sample: float | None = None,
    progress: bool | None = None,
    threads: int | None = None,
    max_ranges: int | None = MAX_RANGES_SHOWN,
) -> VerifyResult:
    """Check ``path`` and return what is wrong; raises only for bad arguments or no repository.

    ``max_ranges`` byte ranges are named per damaged disk (None: all of them).
    """
    if vm is not None:
        validate_vm_name(vm)
    if sample is not None and not 0 < sample <= 100:
        raise UsageError(f"--sample {sample:g} must be a percentage above 0 and at most 100")
    config = RepoConfig.load(path)
    keys = open_keys(path, config)  # a wrong key is an error of its own, not index damage
    t0 = time.monotonic()
    try:
        repo = Repository.open(path, keys)
    except IndexAccessError:
        raise
    except RepositoryError as exc:
        result = _without_index(path, config, str(exc), threads, keys)
    else:
        try:
            # The index in force, not one replaced meanwhile; and a lease, so that a gc
            # beside us deletes no pack of objects we listed before it condemned them.
            with repo.lock(), repo.lease("verify", required=False):
                result = _Verifier(repo, vm, sample, progress, threads, max_ranges).run()
        except INDEX_DAMAGE as exc:
            result = _without_index(path, config, f"the index is damaged ({exc})", threads, keys)
        finally:
            repo.close()
    result.elapsed = time.monotonic() - t0
    return result


class _Verifier:
    def __init__(
        self,
        repo: Repository,
        vm: str | None,
        sample: float | None,
        progress: bool | None,
        threads: int | None,
        max_ranges: int | None,
    ) -> None:
        self.repo = repo
        self.max_ranges = max_ranges
        self.index = repo.index
        self.cs = repo.config.chunk_size
        self.vm = vm
        self.sample = sample
        self.progress_enabled = progress
        self.threads = threads or max(2, os.cpu_count() or 1)
        self.result = VerifyResult(sample=sample)
        # digest -> problem number, for mapping damage back to disks
        self.bad_chunks: dict[bytes, int] = {}
        self.bad_pages: dict[bytes, int] = {}
        self.bad_blobs: dict[bytes, int] = {}
        #: pack -> (what is wrong, bytes still readable); a problem is made when it matters
        self.bad_packs: dict[bytes, tuple[str, int]] = {}
        self._pack_problems: dict[bytes, int] = {}
        self.known_packs: set[bytes] = set()
        self._owners: dict[bytes, str] | None = None
        #: object keys (type byte + digest) reached from restore points; --vm and --sample only
        self.referenced: set[bytes] = set()
        self.walker = MapWalker(repo.config.page_refs, self._load_page)

    # -- helpers ------------------------------------------------------------------

    def _problem(self, subject: str, message: str) -> int:
        self.result.problems.append(Problem(subject, message))
        return len(self.result.problems) - 1

    def _load_page(self, digest: bytes) -> bytes:
        return self.repo.page_cache.get(digest)

    @staticmethod
    def _short(digest: bytes) -> str:
        return digest.hex()[:16]

    # -- the run ------------------------------------------------------------------

    def run(self) -> VerifyResult:
        rps = self.repo.restore_points(self.vm)
        if self.vm is not None and not rps:
            raise UsageError(f"unknown VM {self.vm!r}: it has no restore points")
        self.result.restore_points = len(rps)
        self.result.vms = len({rp.vm for rp in rps})
        docs = self.index.read(
            lambda t: {(d["vm"], d["id"]): d for d in self.index.rp_docs(t, self.vm)}
        )
        self._check_packs()
        for rp in rps:
            self._check_rp(rp, docs.get((rp.vm, rp.id)))
        self.result.pages = self.walker.pages_loaded
        for fault in self.walker.faults:
            if fault.digest in self.bad_pages:
                continue
            label = self._lost_with_pack(self.index.locate(RecordType.PAGE, fault.digest))
            if label is None:
                label = self._problem(f"map page {self._short(fault.digest)}", fault.message)
            self.bad_pages[fault.digest] = label
        self._check_objects()
        self._leftovers()
        self._permissions()
        self._map_damage(rps)
        return self.result

    def _check_rp(self, rp: RestorePoint, doc: dict[str, object] | None) -> None:
        name = f"{rp.vm}/{rp.id}"
        shape = self.repo.config
        inconsistent = rp.inconsistency(shape.chunk_size, shape.page_refs)
        if inconsistent is not None:
            self.result.problems.append(
                Problem(
                    f"restore point {name}",
                    f"its record disagrees with its map ({inconsistent}): every read of its "
                    "disks fails with EIO",
                    [name],
                )
            )
        if doc is not None:
            digest = rp_record_digest(doc, self.repo.keys)
            if self.index.locate(RecordType.RESTORE_POINT, digest) is None:
                self.result.problems.append(
                    Problem(
                        f"restore point {name}",
                        "its own record is not in the index, so rebuild-index could not restore it",
                        [name],
                    )
                )
            else:
                self.referenced.add(bytes((RecordType.RESTORE_POINT,)) + digest)
        for cfg in rp.configs:
            digest = bytes.fromhex(cfg.digest)
            if self.index.locate(RecordType.BLOB, digest) is None:
                n = self.bad_blobs.setdefault(
                    digest,
                    self._problem(f"config blob {self._short(digest)}", "is not in the index"),
                )
                self.result.problems[n].affects.append(f"{name} config file {cfg.name}")
            else:
                self.referenced.add(bytes((RecordType.BLOB,)) + digest)
        for disk in rp.disks:
            if disk.inconsistency(shape.chunk_size, shape.page_refs) is not None:
                continue  # named above; its map's shape is not known
            with self.index.reading() as txn:
                self.walker.walk(
                    disk.map, functools.partial(self._check_chunk_refs, txn, capacity=disk.capacity)
                )

    def _check_chunk_refs(
        self, txn: lmdb.Transaction, page: bytes, first: int, *, capacity: int
    ) -> None:
        """Every chunk a level-0 page references is indexed, with the length its position needs.

        A page's references are looked up in one LMDB call, and a page whose
        chunks are all present and full-sized (nearly all of them) is done
        without a Python step per reference; anything else goes through
        :meth:`_check_chunk_refs_one_by_one`, which says what is wrong.
        """
        cs = self.cs
        n = len(page) // 32
        last = (capacity - 1) // cs  # the disk's last chunk: the only one that may be short
        if capacity % cs and first <= last < first + n:
            self._check_chunk_refs_one_by_one(txn, page, first, capacity=capacity)
            return
        chunk_key = bytes((RecordType.CHUNK,))
        zero_key = chunk_key + ZERO_DIGEST
        keys = [chunk_key + page[i : i + 32] for i in range(0, n * 32, 32)]
        keys = [k for k in keys if k != zero_key]
        if self.bad_chunks:
            keys = [k for k in keys if k[1:] not in self.bad_chunks]
        with txn.cursor(db=self.index.dbs["objects"]) as cur:
            found = cur.getmulti(keys)
        full = _RAW_LEN.pack(cs)  # a full chunk's raw length as its location stores it
        if len(found) != len(keys) or any(v[-4:] != full for _k, v in found):
            self._check_chunk_refs_one_by_one(txn, page, first, capacity=capacity)
        elif self.vm is not None or self.sample is not None:
            self.referenced.update(keys)

    def _check_chunk_refs_one_by_one(
        self, txn: lmdb.Transaction, page: bytes, first: int, *, capacity: int
    ) -> None:
        cs = self.cs
        chunk_key = bytes((RecordType.CHUNK,))
        track = self.vm is not None or self.sample is not None
        for k in range(len(page) // 32):
            ref = page[k * 32 : (k + 1) * 32]
            if ref == ZERO_DIGEST or ref in self.bad_chunks:
                continue
            raw = txn.get(chunk_key + ref, db=self.index.dbs["objects"])
            if raw is None:
                self.bad_chunks[ref] = self._problem(
                    f"chunk {self._short(ref)}", "is not in the index"
                )
                continue
            loc = Location(*LOCATION.unpack(raw))
            i = first + k
            expected = min(cs, capacity - i * cs)
            if loc.raw_len != expected:
                self.bad_chunks[ref] = self._problem(
                    f"chunk {self._short(ref)}",
                    f"is {loc.raw_len} bytes long where the map needs {expected}",
                )
            elif track:
                self.referenced.add(chunk_key + ref)

    # -- re-reading objects, sequentially ---------------------------------------------

    def _entries(self) -> list[_Entry]:
        """Objects to re-hash: all, or those ``--vm`` reaches; the walk already hashed its pages."""
        seen_pages = {key[:32] for key in self.walker.seen}
        referenced = self.referenced if self.vm is not None else None
        page = RecordType.PAGE
        unpack = LOCATION.unpack
        out: list[_Entry] = []

        def collect(txn: lmdb.Transaction) -> None:
            with txn.cursor(db=self.index.dbs["objects"]) as cur:
                for key, value in cur:
                    rtype = key[0]
                    digest = key[1:]
                    if rtype == page and digest in seen_pages:
                        continue
                    if referenced is not None and key not in referenced:
                        continue
                    out.append(_Entry(*unpack(value), rtype, digest))

        self.index.read(collect)
        return out

    def _check_packs(self) -> None:
        """Pack-level checks of every pack the index names, before any object is read."""
        store = self.repo.packs
        packs = self.index.read(
            lambda t: {k: PACK_INFO.unpack(v)[0] for k, v in self.index.items(t, "packs")}
        )
        self.known_packs = set(packs)
        for pack_id, size in sorted(packs.items()):
            name = pack_id.hex()
            try:
                actual = store.size(pack_id)
                header = store.read(pack_id, 0, PACK_HEADER.size)
                check_pack_header(header, self.repo.config.repository_id, name)
            except IntegrityError as exc:
                message = str(exc).removeprefix(f"pack {name}: ").removeprefix(f"pack {name} ")
                self.bad_packs[pack_id] = (message, 0)
                continue
            if actual < size:
                self.bad_packs[pack_id] = (f"is truncated: {actual} of {size} bytes", actual)
            elif actual > size:
                self.result.warnings.append(f"pack {name} is {actual} bytes, the index says {size}")

    def _lost_with_pack(self, loc: Location | None) -> int | None:
        """The problem number of a bad pack that takes this object with it, if any."""
        bad = self.bad_packs.get(loc.pack_id) if loc is not None else None
        if (
            bad is not None
            and loc is not None
            and (loc.offset + RECORD_HEADER_SIZE + loc.stored_len > bad[1])
        ):
            return self._pack_problem(loc.pack_id)
        return None

    def _pack_problem(self, pack_id: bytes) -> int:
        label = self._pack_problems.get(pack_id)
        if label is None:
            label = self._pack_problems[pack_id] = self._problem(
                f"pack {pack_id.hex()}", self.bad_packs[pack_id][0]
            )
        return label

    def _check_objects(self) -> None:
        entries = self._entries()
        entries.sort()  # by pack, then offset
        rng = random.Random()
        sample = self.sample
        chunk = RecordType.CHUNK
        work: list[_Entry] = []
        for pack_id, group in itertools.groupby(entries, key=lambda e: e.pack_id):
            if pack_id not in self.known_packs:
                self._problem(
                    f"pack {pack_id.hex()}",
                    "holds indexed objects but is not in the index's pack list",
                )
            bad = self.bad_packs.get(pack_id)
            for e in group:
                if bad is not None and e.offset + RECORD_HEADER_SIZE + e.stored_len > bad[1]:
                    self._mark_bad([e], self._pack_problem(pack_id))
                elif sample is None or e.rtype != chunk or rng.random() * 100 < sample:
                    work.append(e)
        if self.vm is None:  # a damaged pack is a problem even if nothing we checked was in it
            for pack_id in sorted(self.bad_packs):
                self._pack_problem(pack_id)
        self._hash(work)

    def _mark_bad(self, entries: Iterable[_Entry], problem: int) -> None:
        for e in entries:
            target = {
                RecordType.CHUNK: self.bad_chunks,
                RecordType.PAGE: self.bad_pages,
                RecordType.BLOB: self.bad_blobs,
            }.get(RecordType(e.rtype))
            if target is not None:
                target.setdefault(e.digest, problem)

    def _hash(self, work: list[_Entry]) -> None:
        """Read ``work`` (sorted by pack, offset) window by window; check the windows in threads.

        One window is one task, so the pool's per-task cost is paid once per
        hundred-odd records, and only failures travel back.
        """
        windows = plan_windows(work)
        total = sum(w.nbytes for w in windows)
        progress = Progress(total, label="verify: ", enabled=self.progress_enabled)
        store = self.repo.packs
        in_flight = 2 * self.threads  # windows queued for or being checked
        pending: deque[tuple[_Window, Future[_Failures], _Buffer | None]] = deque()
        with contextlib.ExitStack() as stack:
            items: Iterator[tuple[_Window, _Buffer | None, int | str]]
            release: Callable[[_Buffer], None]
            if isinstance(store, LocalPackStore):
                # a buffer for each window in flight, the one being queued and two read ahead
                reader = stack.enter_context(PackReader(store, windows, in_flight + 3))
                items, release = iter(reader), reader.release
            else:
                items, release = _read_from_store(store, windows), _keep
            # entered last, left first: no checker still looks at a buffer the reader frees
            pool = stack.enter_context(
                ThreadPoolExecutor(self.threads, thread_name_prefix="repofs-verify")
            )
            for window, buf, n in items:
                if buf is None:
                    failed = [(e, str(n)) for e in window.entries]
                    pending.append((window, _done(failed), None))
                else:
                    fut = pool.submit(
                        _check_window, memoryview(buf)[: int(n)], window, self.repo.keys
                    )
                    pending.append((window, fut, buf))
                while len(pending) > in_flight:
                    self._collect(*pending.popleft(), release, progress)
            while pending:
                self._collect(*pending.popleft(), release, progress)
        progress.finish()

    def _collect(
        self,
        window: _Window,
        fut: Future[_Failures],
        buf: _Buffer | None,
        release: Callable[[_Buffer], None],
        progress: Progress,
    ) -> None:
        failures = fut.result()
        if buf is not None:
            release(buf)  # the check is over: nothing looks at the buffer any more
        self.result.objects_checked += len(window.entries)
        self.result.bytes_checked += window.nbytes
        progress.update(window.nbytes)
        for e, err in failures:
            rtype = RecordType(e.rtype)
            kind = rtype.name.lower().replace("_", " ")
            if kind == "page":
                kind = "map page"
            n = self._problem(f"{kind} {self._short(e.digest)}", err)
            self._mark_bad([e], n)
            if rtype == RecordType.RESTORE_POINT:
                owner = self._record_owners().get(e.digest, "a restore point")
                self.result.problems[n].affects.append(
                    f"{owner}: its own record (its data may be whole; rebuild-index, while "
                    "this index is readable, writes the record again from the index's copy)"
                )
            elif rtype == RecordType.TOMBSTONE:
                self.result.problems[n].affects.append(
                    "a tombstone: rebuild-index could bring a pruned restore point back"
                )
            elif rtype == RecordType.PROTECTION:
                self.result.problems[n].affects.append(
                    "a protection record: rebuild-index could restore an older protected flag"
                )

    def _record_owners(self) -> dict[bytes, str]:
        """``vm/id`` by the digest of the restore point's own record, from the index's copies."""
        if self._owners is None:
            with self.index.reading() as txn:
                self._owners = {
                    rp_record_digest(doc, self.repo.keys): f"{doc['vm']}/{doc['id']}"
                    for doc in self.index.rp_docs(txn)
                }
        return self._owners

    # -- leftovers and permissions --------------------------------------------------

    def _leftovers(self) -> None:
        unindexed = unindexed_packs(self.repo)
        unlisted = unlisted_restore_points(self.repo, unindexed)
        if unlisted:
            n = self._problem(
                f"{len(unindexed)} pack(s) not in the index",
                f"hold {len(unlisted)} restore point(s) the index does not list: the index is "
                "older than the packs; run 'repofs rebuild-index' (gc refuses to run until then)",
            )
            self.result.problems[n].affects.extend(unlisted)
            return
        for pack_id in unindexed:
            self.result.warnings.append(
                f"pack {pack_id.hex()} is not in the index "
                "(left by an interrupted ingest or gc; gc removes it)"
            )
        if os.path.isdir(os.path.join(self.repo.path, NEW_INDEX_DIR)):
            self.result.warnings.append(
                f"{NEW_INDEX_DIR}/ is left by an interrupted rebuild-index (gc removes it)"
            )
        tmp = self.repo.packs.tmp_dir
        leftovers = os.listdir(tmp) if os.path.isdir(tmp) else []
        if leftovers:
            self.result.warnings.append(
                f"{len(leftovers)} unfinished pack(s) in {tmp} (gc removes them)"
            )

    def _permissions(self) -> None:
        self.result.warnings.extend(permission_warnings(self.repo.path))

    # -- mapping damage to disks ------------------------------------------------------

    def _map_damage(self, rps: list[RestorePoint]) -> None:
        problems = self.result.problems
        if self.bad_chunks or self.bad_pages:
            mapper = DamageMapper(
                self.repo.config.page_refs, self._load_page, self.bad_chunks, self.bad_pages
            )
            unlabelled = -1
            for rp in rps:
                for disk in rp.disks:
                    for label, ranges in sorted(mapper.chunk_ranges(disk.map).items()):
                        if label == unlabelled:
                            label = unlabelled = self._problem(
                                "map pages", "became unreadable while verify ran"
                            )
                        spans = byte_ranges(ranges, self.cs, disk.capacity)
                        limit = len(spans) if self.max_ranges is None else self.max_ranges
                        shown = ", ".join(f"{a}-{b - 1}" for a, b in spans[:limit])
                        more = (
                            f" and {len(spans) - limit} more ranges (--all-ranges names them)"
                            if len(spans) > limit
                            else ""
                        )
                        problems[label].affects.append(
                            f"{rp.vm}/{rp.id} {disk.name}-flat.vmdk bytes {shown}{more}"
                        )
        for digest, label in self.bad_blobs.items():
            for rp in rps:
                for cfg in rp.configs:
                    entry = f"{rp.vm}/{rp.id} config file {cfg.name}"
                    if cfg.digest == digest.hex() and entry not in problems[label].affects:
                        problems[label].affects.append(entry)
        for p in problems:
            if not p.affects:
                p.affects.append(
                    "no restore point reaches it through a readable map, but a later "
                    "ingest could deduplicate against it: 'repofs rebuild-index' "
                    "drops what is damaged from the index"
                )


def plan_windows(work: list[_Entry]) -> list[_Window]:
    """Cut ``work`` (sorted by pack, offset) into reads of at most ``WINDOW`` bytes.

    A window holds whole records only and reads through holes under
    ``GAP``, where seeking would cost more than reading.  Its start is
    rounded down to a block boundary so that it can be read with
    ``O_DIRECT``; neighbouring windows may share that one block.
    """
    out: list[_Window] = []
    i, n = 0, len(work)
    while i < n:
        first = work[i]
        pack, begin = first.pack_id, first.offset
        start = begin - begin % ALIGN
        end = begin + RECORD_HEADER_SIZE + first.stored_len
        nbytes = end - begin
        j = i + 1
        while j < n:
            e = work[j]
            e_end = e.offset + RECORD_HEADER_SIZE + e.stored_len
            if e.pack_id != pack or e.offset - end > GAP or e_end - start > WINDOW:
                break
            end = max(end, e_end)
            nbytes += e_end - e.offset
            j += 1
        out.append(_Window(pack, start, end - start, work[i:j], nbytes))
        i = j
    return out


class PackReader:
    """Reads windows of many packs in order on one thread, into a few reused aligned buffers.

    Yields ``(window, buffer, length)``, or ``(window, None, error)`` for a
    window that cannot be read; give each buffer back with :meth:`release`
    once nothing looks at it any more.  At most ``buffers`` windows are read
    ahead of the releases, which bounds memory and throttles the reader to
    the checkers' pace.

    Why not one :class:`repofs.directio.SequentialReader` per pack: each one
    maps and faults in a fresh buffer (shared memory, 8 MiB here) and copies
    every window out of it into new ``bytes``.  With 32 MiB packs that
    was 1.1-1.4 s of system time and 4.4-4.5 s of CPU for the 2 GiB
    benchmark, against 0.2-0.3 s and 3.0-3.4 s here: the buffers are mapped
    once per run, one thread reads across pack boundaries, and the
    checkers read straight from the buffers.  The reads themselves are the
    same: ``O_DIRECT`` (no page cache: no kernel page allocation, zero-fill
    and copy per byte, and the bytes checked are the disk's, not a cached
    copy), and the page cache for packs whose file system refuses it.
    """

    def __init__(self, store: LocalPackStore, windows: list[_Window], buffers: int) -> None:
        size = max((w.length for w in windows), default=0)
        size = max(HUGE_PAGE, -(-size // HUGE_PAGE) * HUGE_PAGE)
        self._buffers = [direct_buffer(size) for _ in range(buffers)]
        self._free: queue.SimpleQueue[mmap.mmap | None] = queue.SimpleQueue()
        for buf in self._buffers:
            self._free.put(buf)
        self._out: queue.SimpleQueue[tuple[_Window, mmap.mmap | None, int | str] | None] = (
            queue.SimpleQueue()
        )
        self._store = store
        self.windows = windows
        self._stop = threading.Event()
        self._crash: BaseException | None = None
        #: packs read with O_DIRECT and through the page cache (for tests and curiosity)
        self.direct_packs = 0
        self.buffered_packs = 0
        self._thread = threading.Thread(target=self._run, name="repofs-verify-read", daemon=True)
        self._thread.start()

    def __iter__(self) -> Iterator[tuple[_Window, mmap.mmap | None, int | str]]:
        while (item := self._out.get()) is not None:
            yield item
        if self._crash is not None:
            raise RuntimeError("verify's pack reader failed") from self._crash

    def release(self, buf: mmap.mmap) -> None:
        self._free.put(buf)

    def close(self) -> None:
        """Stop reading ahead and free the buffers; safe to call twice."""
        self._stop.set()
        self._free.put(None)  # wakes the reader if it waits for a buffer
        self._thread.join()
        for buf in self._buffers:
            with contextlib.suppress(BufferError):  # a view is still out: the GC frees it
                buf.close()

    def __enter__(self) -> PackReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _run(self) -> None:
        try:
            for pack_id, group in itertools.groupby(self.windows, key=lambda w: w.pack_id):
                if self._stop.is_set() or not self._read_pack(pack_id, list(group)):
                    return
        except BaseException as exc:  # a bug: must not end the stream as if all was read
            self._crash = exc
        finally:
            self._out.put(None)

    def _read_pack(self, pack_id: bytes, group: list[_Window]) -> bool:
        """Read one pack's windows; False when asked to stop."""
        name = pack_id.hex()
        path = self._store.path_of(pack_id)
        direct = True
        try:
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_DIRECT)
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                direct = False  # the file system refuses O_DIRECT
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                error = f"pack {name} is missing"
            else:
                error = f"pack {name}: cannot open: {exc.strerror}"
            for w in group:
                self._out.put((w, None, error))
            return True
        try:
            for w in group:
                buf = self._free.get()
                if buf is None or self._stop.is_set():
                    return False
                try:
                    try:
                        n = read_into(fd, buf, w.start, w.length, direct)
                    except OSError as exc:
                        if not direct or exc.errno != errno.EINVAL:
                            raise
                        # The file system took the open but not the read: the page cache then.
                        os.close(fd)
                        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
                        direct = False
                        n = read_into(fd, buf, w.start, w.length, direct)
                except OSError as exc:
                    self._free.put(buf)
                    error = f"pack {name}: read error at offset {w.start}: {exc.strerror}"
                    self._out.put((w, None, error))
                else:
                    self._out.put((w, buf, n))
        finally:
            os.close(fd)
            if direct:
                self.direct_packs += 1
            else:
                self.buffered_packs += 1
        return True


def _read_from_store(
    store: PackStore, windows: list[_Window]
) -> Iterator[tuple[_Window, bytes | None, int | str]]:
    """Windows of a store that is not a local directory (an object store): one ranged read each."""
    for w in windows:
        try:
            data = store.read(w.pack_id, w.start, w.length)
        except IntegrityError as exc:
            yield w, None, str(exc)
        else:
            yield w, data, len(data)


def _keep(buf: _Buffer) -> None:
    """Buffers of other stores are plain bytes: nothing to give back."""


def _check_window(data: memoryview, window: _Window, keys: Keys = PLAIN) -> _Failures:
    """Check every record of one window: header, that it is the object indexed, its content.

    verify's hot loop, run on every core: zstd and BLAKE3 release the GIL,
    so what runs under it (header fields, compares) is kept to a few plain
    operations per record.  Payloads are sliced out of ``data`` without
    copies, and the exact message of a bad header is only worked out when
    one fails.
    """
    unpack = RECORD_HEADER.unpack_from
    crc32 = zlib.crc32
    hasher = keys.name if keys.encrypted else lambda raw: blake3.blake3(raw).digest()
    size = len(data)
    base = window.start
    dctx = thread_decompressor()
    zstd, raw_codec = int(Codec.ZSTD), int(Codec.NONE)
    failures: _Failures = []
    for e in window.entries:
        start = e.offset - base
        body = start + RECORD_HEADER_SIZE
        end = body + e.stored_len
        if end > size:
            failures.append(
                (
                    e,
                    f"{_where(e)}: truncated: the record needs {end - start} bytes, "
                    f"the pack ends at {base + size}",
                )
            )
            continue
        magic, rtype, codec, _flags, stored, raw_len, digest, crc = unpack(data, start)
        if (
            magic != RECORD_MAGIC
            or crc32(data[start : body - 4]) != crc
            or rtype != e.rtype
            or digest != e.digest
            or stored != e.stored_len
            or raw_len != e.raw_len
            or codec not in (zstd, raw_codec)
        ):
            failures.append((e, _header_problem(data[start:body], e)))
            continue
        payload: bytes | memoryview = data[body:end]
        if keys.encrypted:
            try:
                payload = keys.open(rtype, digest, payload, _where(e))
            except IntegrityError as exc:
                failures.append((e, str(exc)))
                continue
        if codec == zstd:
            try:
                raw: bytes | memoryview = dctx.decompress(payload, max_output_size=raw_len)
            except zstandard.ZstdError as exc:
                failures.append((e, f"{_where(e)}: cannot decompress: {exc}"))
                continue
            if len(raw) != raw_len:
                failures.append(
                    (e, f"{_where(e)}: decompressed to {len(raw)} bytes, expected {raw_len}")
                )
                continue
        else:
            raw = payload
        if hasher(raw) != digest:
            failures.append((e, f"{_where(e)}: content does not match its digest"))
    return failures


def _where(e: _Entry) -> str:
    return f"pack {e.pack_id.hex()} offset {e.offset}"


def _header_problem(header: memoryview, e: _Entry) -> str:
    """What is wrong with a record header that failed the quick checks, in decode_header's words."""
    where = _where(e)
    try:
        hdr = decode_header(header, where)
    except IntegrityError as exc:
        return str(exc)
    if hdr.type != e.rtype or hdr.digest != e.digest:
        return f"{where}: holds another object than the index says"
    return f"{where}: lengths differ from the index"


def _done(value: _Failures) -> Future[_Failures]:
    fut: Future[_Failures] = Future()
    fut.set_result(value)
    return fut


def permission_warnings(repo_path: str) -> list[str]:
    """Files and directories of the repository that anyone but the owner may access."""
    out = []
    for dirpath, dirnames, filenames in os.walk(repo_path):
        for name in [".", *dirnames, *filenames]:
            p = os.path.normpath(os.path.join(dirpath, name))
            if name == "." and dirpath != repo_path:
                continue
            try:
                mode = os.lstat(p).st_mode
            except OSError:
                continue
            if stat.S_ISLNK(mode):
                continue
            if mode & 0o077:
                out.append(
                    f"{p} is accessible to others than its owner "
                    f"(mode {stat.S_IMODE(mode):04o}; repositories are owner-only)"
                )
    return out


def _without_index(
    path: str, config: RepoConfig, why: str, threads: int | None, keys: Keys = PLAIN
) -> VerifyResult:
    """The index cannot be used: name every restore point the packs hold; none is readable now."""
    from repofs.packscan import check_payloads

    result = VerifyResult()
    store = LocalPackStore(os.path.join(path, PACKS_DIR))
    found: dict[tuple[str, str], int] = {}
    dead: set[tuple[str, str, int]] = set()
    keep = frozenset({RecordType.RESTORE_POINT, RecordType.TOMBSTONE})
    with ThreadPoolExecutor(threads or max(2, os.cpu_count() or 1)) as pool:
        for pack_id in store.list():
            scan = scan_pack(store, pack_id, config.repository_id)
            scan.records = [r for r in scan.records if r.header.type in keep]
            for rec, raw, _err in check_payloads(scan, pool, keep, keys=keys):
                if raw is None:
                    continue
                if rec.header.type == RecordType.TOMBSTONE:
                    t = parse_tombstone(raw)
                    if t is not None:
                        dead.add(t.target)
                else:
                    doc = parse_rp_record(raw)
                    if doc is not None:
                        key = (doc["vm"], doc["id"])
                        found[key] = max(found.get(key, 0), doc["seq"])
    store.close()
    live = sorted(
        f"{vm}/{rp_id}" for (vm, rp_id), seq in found.items() if (vm, rp_id, seq) not in dead
    )
    result.restore_points = len(live)
    result.vms = len({name.split("/")[0] for name in live})
    hint = (
        ""
        if "rebuild-index" in why
        else "; run 'repofs rebuild-index' to rebuild it from the packs"
    )
    result.problems.append(
        Problem(
            "index",
            f"{why}{hint}",
            [f"{name} (unreadable until the index is rebuilt)" for name in live]
            or ["no restore point was found in the packs"],
        )
    )
    result.warnings.extend(permission_warnings(path))
    return result
