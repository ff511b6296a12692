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
   into a few reused buffers (:mod:`.packreader`); decompression and
   hashing run straight from those buffers on every core, one window per
   task (:mod:`.recordcheck`), so verify reads each pack once, front to
   back, at the disk's speed or the cores' (zstd and BLAKE3), whichever is
   lower;
6. leftovers (packs the index does not know, unfinished packs) and files
   that others than the owner may read are reported as warnings.

A repository in a bucket (:mod:`.bucket`) is checked the same way against
this host's cache of its index, with pack sizes from one LIST and windows
read with a few ranged GETs in flight, plus its log: every log object and
the newest checkpoint must decode.  ``sizes_only`` (``verify
--sizes-only``) downloads no pack: the pack sizes and the log only.

Each problem then lists the restore points, disks and byte ranges it
affects (:mod:`.damage`).
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import os
import random
import struct
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import lmdb

from repofs.errors import IndexAccessError, IntegrityError, RepositoryError, UsageError
from repofs.maintenance.gc.leftovers import unindexed_packs, unlisted_restore_points
from repofs.maintenance.verify.damage import map_damage
from repofs.maintenance.verify.noindex import _without_index
from repofs.maintenance.verify.packreader import (
    STORE_READERS,
    PackReader,
    _keep,
    _read_from_store,
)
from repofs.maintenance.verify.permissions import permission_warnings
from repofs.maintenance.verify.recordcheck import _check_window
from repofs.maintenance.verify.result import Problem, VerifyResult
from repofs.maintenance.verify.windows import (
    STORE_WINDOW,
    WINDOW,
    _Buffer,
    _Entry,
    _Failures,
    _Window,
    plan_windows,
)
from repofs.store.config import RepoConfig
from repofs.store.location import is_s3
from repofs.store.mapwalk import MapWalker
from repofs.store.names import validate_vm_name
from repofs.store.opening import open_repository
from repofs.store.packstore import LocalPackStore
from repofs.store.records import (
    PACK_HEADER,
    RECORD_HEADER_SIZE,
    ZERO_DIGEST,
    RecordType,
    check_pack_header,
)
from repofs.store.repository import NEW_INDEX_DIR, Repository, open_keys
from repofs.store.restorepoint import RestorePoint
from repofs.store.rprecords import rp_record_digest
from repofs.store.schema import (
    Location,
    decode_location,
    decode_pack_info,
    key_digest,
    key_type,
    location_fields,
    raw_len_suffix,
    type_prefix,
)
from repofs.util.progress import Progress

MAX_RANGES_SHOWN = 8
INDEX_DAMAGE = (lmdb.Error, json.JSONDecodeError, struct.error, UnicodeDecodeError)


def verify_repository(
    path: str,
    *,
    vm: str | None = None,
    sample: float | None = None,
    progress: bool | None = None,
    threads: int | None = None,
    max_ranges: int | None = MAX_RANGES_SHOWN,
    sizes_only: bool = False,
) -> VerifyResult:
    """Check ``path`` and return what is wrong; raises only for bad arguments or no repository.

    ``max_ranges`` byte ranges are named per damaged disk (None: all of them).
    ``sizes_only``: read no pack, only check that each exists with its size
    (and, in a bucket, that the log decodes).
    """
    if vm is not None:
        validate_vm_name(vm)
    if sample is not None and not 0 < sample <= 100:
        raise UsageError(f"--sample {sample:g} must be a percentage above 0 and at most 100")
    if sizes_only and (vm is not None or sample is not None):
        raise UsageError("--sizes-only checks every pack: it takes neither --vm nor --sample")
    if is_s3(path):
        from repofs.maintenance.verify.bucket import verify_bucket

        return verify_bucket(
            path,
            lambda repo: _Verifier(repo, vm, sample, progress, threads, max_ranges),
            sizes_only=sizes_only,
        )
    config = RepoConfig.load(path)
    keys = open_keys(path, config)  # a wrong key is an error of its own, not index damage
    t0 = time.monotonic()
    try:
        repo = open_repository(path, keys)
    except IndexAccessError:
        raise
    except RepositoryError as exc:
        result = _without_index(path, config, str(exc), threads, keys)
    else:
        try:
            # The index in force, not one replaced meanwhile; and a lease, so that a gc
            # beside us deletes no pack of objects we listed before it condemned them.
            with repo.lock(), repo.lease("verify", required=False):
                if sizes_only:
                    from repofs.maintenance.verify.bucket import check_pack_sizes

                    result = VerifyResult(mode="sizes")
                    check_pack_sizes(repo, result)
                else:
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
        chunk_key = type_prefix(RecordType.CHUNK)
        zero_key = chunk_key + ZERO_DIGEST
        keys = [chunk_key + page[i : i + 32] for i in range(0, n * 32, 32)]
        keys = [k for k in keys if k != zero_key]
        if self.bad_chunks:
            keys = [k for k in keys if key_digest(k) not in self.bad_chunks]
        with txn.cursor(db=self.index.dbs["objects"]) as cur:
            found = cur.getmulti(keys)
        full = raw_len_suffix(cs)  # a full chunk's raw length as its location stores it
        if len(found) != len(keys) or any(not v.endswith(full) for _k, v in found):
            self._check_chunk_refs_one_by_one(txn, page, first, capacity=capacity)
        elif self.vm is not None or self.sample is not None:
            self.referenced.update(keys)

    def _check_chunk_refs_one_by_one(
        self, txn: lmdb.Transaction, page: bytes, first: int, *, capacity: int
    ) -> None:
        cs = self.cs
        chunk_key = type_prefix(RecordType.CHUNK)
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
            loc = decode_location(raw)
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
        unpack = location_fields
        out: list[_Entry] = []

        def collect(txn: lmdb.Transaction) -> None:
            with txn.cursor(db=self.index.dbs["objects"]) as cur:
                for key, value in cur:
                    rtype = key_type(key)
                    digest = key_digest(key)
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
            lambda t: {k: decode_pack_info(v)[0] for k, v in self.index.items(t, "packs")}
        )
        self.known_packs = set(packs)
        self.result.packs = len(packs)
        # A bucket: every size from one LIST, and no GET per pack for its header (each
        # record authenticates on its own, and a foreign pack's records do not).
        listed = _listed_sizes(store)
        for pack_id, size in sorted(packs.items()):
            name = pack_id.hex()
            try:
                if listed is not None:
                    if pack_id not in listed:
                        raise IntegrityError(f"pack {name} is missing")
                    actual = listed[pack_id]
                else:
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
        local = isinstance(self.repo.packs, LocalPackStore)
        windows = plan_windows(work, WINDOW if local else STORE_WINDOW)
        total = sum(w.nbytes for w in windows)
        progress = Progress(total, label="verify: ", enabled=self.progress_enabled)
        store = self.repo.packs
        in_flight = 2 * self.threads  # windows queued for or being checked
        pending: deque[tuple[_Window, Future[_Failures], _Buffer | None]] = deque()
        with contextlib.ExitStack() as stack:
            items: Iterator[tuple[_Window, _Buffer | None, int | str]]
            release: Callable[[_Buffer], None]
            if local:
                # a buffer for each window in flight, the one being queued and two read ahead
                reader = stack.enter_context(PackReader(store, windows, in_flight + 3))
                items, release = iter(reader), reader.release
            else:
                items = _read_from_store(store, windows, STORE_READERS)
                release = _keep
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
        if not isinstance(self.repo.packs, LocalPackStore):
            from repofs.maintenance.verify.bucket import leftover_warnings

            self.result.warnings.extend(leftover_warnings(self.repo))
            return
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
        map_damage(
            self.result.problems,
            self._problem,
            rps,
            page_refs=self.repo.config.page_refs,
            chunk_size=self.cs,
            load_page=self._load_page,
            bad_chunks=self.bad_chunks,
            bad_pages=self.bad_pages,
            bad_blobs=self.bad_blobs,
            max_ranges=self.max_ranges,
        )


def _listed_sizes(store: object) -> dict[bytes, int] | None:
    """Every pack's size from one listing, for stores that have one (a bucket); else None."""
    list_sized = getattr(store, "list_sized", None)
    if list_sized is None:
        return None
    return {pack_id: size for pack_id, size, _mtime in list_sized()}


def _done(value: _Failures) -> Future[_Failures]:
    fut: Future[_Failures] = Future()
    fut.set_result(value)
    return fut
