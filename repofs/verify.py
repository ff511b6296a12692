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
   and read in large sequential windows; decompression and hashing run in
   threads, so verify runs close to the disk's sequential read speed;
6. leftovers (packs the index does not know, unfinished packs) and files
   that others than the owner may read are reported as warnings.

Each problem then lists the restore points, disks and byte ranges it
affects: bad chunks and pages are mapped back through every map that
references them (memoised per page).
"""

from __future__ import annotations

import functools
import json
import os
import random
import stat
import struct
import threading
import time
from collections import defaultdict, deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import lmdb
import zstandard

from ingest.progress import Progress
from repofs.config import RepoConfig
from repofs.errors import IntegrityError, RepositoryError, UsageError
from repofs.index import LOCATION, PACK_INFO, Location
from repofs.lock import repository_lock
from repofs.mapwalk import DamageMapper, MapWalker, byte_ranges
from repofs.names import validate_vm_name
from repofs.packscan import scan_pack
from repofs.packstore import LocalPackStore
from repofs.records import (
    PACK_HEADER,
    RECORD_HEADER_SIZE,
    ZERO_DIGEST,
    Codec,
    RecordHeader,
    RecordType,
    check_pack_header,
    decode_header,
    digest_of,
)
from repofs.repository import PACKS_DIR, Repository
from repofs.restorepoint import RestorePoint
from repofs.rprecords import parse_rp_record, parse_tombstone, rp_record_digest

WINDOW = 8 * 1024 * 1024  # one sequential read
GAP = 1024 * 1024  # read through holes smaller than this rather than seek
MAX_RANGES_SHOWN = 8
_Window = tuple[bytes, int]  # bytes read, and the pack offset they start at
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


@dataclass(frozen=True, slots=True)
class _Entry:
    rtype: RecordType
    digest: bytes
    loc: Location


def verify_repository(
    path: str,
    *,
    vm: str | None = None,
    sample: float | None = None,
    progress: bool | None = None,
    threads: int | None = None,
) -> VerifyResult:
    """Check ``path`` and return what is wrong; raises only for bad arguments or no repository."""
    if vm is not None:
        validate_vm_name(vm)
    if sample is not None and not 0 < sample <= 100:
        raise UsageError(f"--sample {sample:g} must be a percentage above 0 and at most 100")
    config = RepoConfig.load(path)
    t0 = time.monotonic()
    try:
        repo = Repository.open(path)
    except RepositoryError as exc:
        result = _without_index(path, config, str(exc), threads)
    else:
        try:
            with repository_lock(path, exclusive=False):
                result = _Verifier(repo, vm, sample, progress, threads).run()
        except INDEX_DAMAGE as exc:
            result = _without_index(path, config, f"the index is damaged ({exc})", threads)
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
    ) -> None:
        self.repo = repo
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
        if doc is not None:
            digest = rp_record_digest(doc)
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
        out: list[_Entry] = []

        def collect(txn: lmdb.Transaction) -> None:
            for key, value in self.index.items(txn, "objects"):
                rtype = RecordType(key[0])
                digest = key[1:]
                if rtype == RecordType.PAGE and digest in seen_pages:
                    continue
                if self.vm is not None and key not in self.referenced:
                    continue
                out.append(_Entry(rtype, digest, Location(*LOCATION.unpack(value))))

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
        by_pack: dict[bytes, list[_Entry]] = defaultdict(list)
        for e in self._entries():
            by_pack[e.loc.pack_id].append(e)
        rng = random.Random()
        work: list[_Entry] = []
        for pack_id in sorted(by_pack):
            if pack_id not in self.known_packs:
                self._problem(
                    f"pack {pack_id.hex()}",
                    "holds indexed objects but is not in the index's pack list",
                )
            for e in sorted(by_pack[pack_id], key=lambda e: e.loc.offset):
                lost = self._lost_with_pack(e.loc)
                if lost is not None:
                    self._mark_bad([e], lost)
                elif (
                    self.sample is None
                    or e.rtype != RecordType.CHUNK
                    or rng.random() * 100 < self.sample
                ):
                    work.append(e)
        if self.vm is None:  # a damaged pack is a problem even if nothing we checked was in it
            for pack_id in sorted(self.bad_packs):
                self._pack_problem(pack_id)
        self._hash(work)

    def _mark_bad(self, entries: list[_Entry], problem: int) -> None:
        for e in entries:
            target = {
                RecordType.CHUNK: self.bad_chunks,
                RecordType.PAGE: self.bad_pages,
                RecordType.BLOB: self.bad_blobs,
            }.get(e.rtype)
            if target is not None:
                target.setdefault(e.digest, problem)

    def _hash(self, work: list[_Entry]) -> None:
        """Read ``work`` (sorted by pack, offset) in large windows; check records in threads."""
        total = sum(RECORD_HEADER_SIZE + e.loc.stored_len for e in work)
        progress = Progress(total, label="verify: ", enabled=self.progress_enabled)
        pending: deque[Future[list[tuple[_Entry, str | None]]]] = deque()
        with ThreadPoolExecutor(self.threads, thread_name_prefix="repofs-verify") as pool:
            for start, stop, data, err in self._windows(work):
                batch = work[start:stop]
                if err is not None:
                    pending.append(_done([(e, err) for e in batch]))
                else:
                    pending.append(pool.submit(_check_window, data, batch))
                while len(pending) > 2 * self.threads:
                    self._collect(pending.popleft().result(), progress)
            while pending:
                self._collect(pending.popleft().result(), progress)
        progress.finish()

    def _windows(self, work: list[_Entry]) -> Iterator[tuple[int, int, _Window | None, str | None]]:
        """Yield ``(start, stop, bytes, error)``: consecutive entries of one pack read at once."""
        i = 0
        while i < len(work):
            first = work[i]
            pack, begin = first.loc.pack_id, first.loc.offset
            end = begin + RECORD_HEADER_SIZE + first.loc.stored_len
            j = i + 1
            while j < len(work):
                e = work[j]
                e_end = e.loc.offset + RECORD_HEADER_SIZE + e.loc.stored_len
                if e.loc.pack_id != pack or e.loc.offset - end > GAP or e_end - begin > WINDOW:
                    break
                end = max(end, e_end)
                j += 1
            try:
                data: bytes | None = self.repo.packs.read(pack, begin, end - begin)
                err = None
            except IntegrityError as exc:
                data, err = None, str(exc)
            yield i, j, (data, begin) if data is not None else None, err
            i = j

    def _collect(self, results: list[tuple[_Entry, str | None]], progress: Progress) -> None:
        for e, err in results:
            self.result.objects_checked += 1
            nbytes = RECORD_HEADER_SIZE + e.loc.stored_len
            self.result.bytes_checked += nbytes
            progress.update(nbytes)
            if err is None:
                continue
            kind = e.rtype.name.lower().replace("_", " ")
            if kind == "page":
                kind = "map page"
            n = self._problem(f"{kind} {self._short(e.digest)}", err)
            self._mark_bad([e], n)
            if e.rtype == RecordType.RESTORE_POINT:
                self.result.problems[n].affects.append(
                    "a restore point's own record: rebuild-index could not restore it"
                )
            elif e.rtype == RecordType.TOMBSTONE:
                self.result.problems[n].affects.append(
                    "a tombstone: rebuild-index could bring a pruned restore point back"
                )

    # -- leftovers and permissions --------------------------------------------------

    def _leftovers(self) -> None:
        known = self.index.read(lambda t: {k for k, _ in self.index.items(t, "packs")})
        for pack_id in self.repo.packs.list():
            if pack_id not in known:
                self.result.warnings.append(
                    f"pack {pack_id.hex()} is not in the index "
                    "(left by an interrupted ingest or gc; gc removes it)"
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
                        shown = ", ".join(f"{a}-{b - 1}" for a, b in spans[:MAX_RANGES_SHOWN])
                        more = (
                            f" and {len(spans) - MAX_RANGES_SHOWN} more ranges"
                            if len(spans) > MAX_RANGES_SHOWN
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


def _check_window(window: _Window, batch: list[_Entry]) -> list[tuple[_Entry, str | None]]:
    """Check every record of one window: header, that it is the object indexed, and its content."""
    data, base = window
    view = memoryview(data)
    out: list[tuple[_Entry, str | None]] = []
    for e in batch:
        start = e.loc.offset - base
        where = f"pack {e.loc.pack_id.hex()} offset {e.loc.offset}"
        try:
            hdr = decode_header(view[start : start + RECORD_HEADER_SIZE], where)
            if hdr.type != e.rtype or hdr.digest != e.digest:
                raise IntegrityError(f"{where}: holds another object than the index says")
            if hdr.stored_len != e.loc.stored_len or hdr.raw_len != e.loc.raw_len:
                raise IntegrityError(f"{where}: lengths differ from the index")
            payload = view[start + RECORD_HEADER_SIZE : start + RECORD_HEADER_SIZE + hdr.stored_len]
            _check_content(hdr, payload, where)
        except IntegrityError as exc:
            out.append((e, str(exc)))
        else:
            out.append((e, None))
    return out


_local = threading.local()


def _check_content(hdr: RecordHeader, payload: memoryview, where: str) -> None:
    """``decode_payload``'s checks without its copies: verify's hot loop.

    Stored-raw content is hashed in place and each thread keeps one zstd
    context; both matter when a 2-core machine has to keep up with a disk.
    """
    if hdr.codec == Codec.ZSTD:
        dctx = getattr(_local, "dctx", None)
        if dctx is None:
            dctx = _local.dctx = zstandard.ZstdDecompressor()
        try:
            raw: bytes | memoryview = dctx.decompress(payload, max_output_size=hdr.raw_len)
        except zstandard.ZstdError as exc:
            raise IntegrityError(f"{where}: cannot decompress: {exc}") from None
    else:
        raw = payload
    if len(raw) != hdr.raw_len:
        raise IntegrityError(f"{where}: decompressed to {len(raw)} bytes, expected {hdr.raw_len}")
    if digest_of(raw) != hdr.digest:
        raise IntegrityError(f"{where}: content does not match its digest")


def _done(value: list[tuple[_Entry, str | None]]) -> Future[list[tuple[_Entry, str | None]]]:
    fut: Future[list[tuple[_Entry, str | None]]] = Future()
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


def _without_index(path: str, config: RepoConfig, why: str, threads: int | None) -> VerifyResult:
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
            for rec, raw, _err in check_payloads(scan, pool, keep):
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
