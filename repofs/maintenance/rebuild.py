"""``repofs rebuild-index``: a new LMDB index from the pack files alone.

Every pack of this repository is read record by record (see
:mod:`repofs.maintenance.packscan`): a record is indexed only if its header checksum
holds and its content matches its digest, so damaged records drop out and
reads of them become clean I/O errors.  Packs of another repository are
left out.  Restore points come back from their own records, minus those a
tombstone names, with the protected flag of their newest PROTECTION record;
their sequence numbers, and their VMs', come back from the records too, so
inode numbers in the mount stay what they were, and the
sequence counter resumes above every number ever used.

The new index is built beside the old one (``index.new``) under the
exclusive lock and swapped in with one atomic ``renameat2(RENAME_EXCHANGE)``
(two renames where the kernel lacks it), so a crash leaves the old index or
the new one, and running it again is always safe.  Processes that still
hold the old index open notice at their next write (``Index.write`` checks
that its file is still the current one); a running mount follows the new
index (:meth:`Index.follow_replacement`, looked at once a second and at once
when a read fails), so it needs no remount.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

import lmdb

from repofs.errors import IntegrityError, RepofsError, RepositoryError
from repofs.maintenance.packscan import check_payloads, scan_pack
from repofs.store.config import RepoConfig
from repofs.store.crypto import Keys
from repofs.store.durable import fsync_dir, os_error
from repofs.store.index import Index, Location
from repofs.store.lock import repository_lock
from repofs.store.mapwalk import MapWalker
from repofs.store.packstore import LocalPackStore
from repofs.store.records import ZERO_DIGEST, RecordType
from repofs.store.repository import (
    INDEX_DIR,
    NEW_INDEX_DIR,
    PACKS_DIR,
    Repository,
    open_keys,
)
from repofs.store.reserve import retry_with_reserve
from repofs.store.rprecords import (
    Protection,
    latest_protections,
    parse_protection,
    parse_rp_record,
    parse_tombstone,
    rp_record_body,
)
from repofs.util.progress import Progress

NEW_DIR = NEW_INDEX_DIR
_KEEP = frozenset({RecordType.RESTORE_POINT, RecordType.TOMBSTONE, RecordType.PROTECTION})


@dataclass
class RebuildResult:
    packs: int = 0
    records: int = 0
    bytes_scanned: int = 0
    skipped_packs: list[str] = field(default_factory=list)
    damaged: list[str] = field(default_factory=list)
    restore_points: int = 0
    vms: int = 0
    tombstoned: int = 0
    incomplete: list[str] = field(default_factory=list)
    next_seq: int = 1
    seconds: float = 0.0
    reserve_given_up: int = 0
    #: restore points whose own record was lost, written again from the old index
    rewritten: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """``rebuild-index --json``: every field; ``incomplete`` non-empty means exit 5."""
        return asdict(self)


@dataclass
class _Found:
    doc: dict[str, Any]
    loc: Location


def rebuild_index(
    path: str, *, threads: int | None = None, progress: bool | None = None
) -> RebuildResult:
    t0 = time.monotonic()
    config = RepoConfig.load(path)
    keys = open_keys(path, config)  # from the packs alone, given the key: asked for first
    with repository_lock(path, exclusive=True):
        _check_packs_present(path)
        new_dir = os.path.join(path, NEW_DIR)
        known = _old_restore_points(path, keys)

        def build() -> RebuildResult:
            attempt = RebuildResult()
            _remove_tree(new_dir)
            try:
                os.mkdir(new_dir, 0o700)
            except OSError as exc:
                raise os_error(exc, new_dir) from None
            index = Index(new_dir, create=True)
            index.names = keys
            store = LocalPackStore(os.path.join(path, PACKS_DIR))
            try:
                found, tombs, flags = _scan_all(store, index, config, attempt, threads, progress)
                repo = Repository(path, config, index, store, keys)
                found += _rewrite_lost_records(repo, found, tombs, known, attempt)
                _restore_points(index, found, tombs, latest_protections(flags), attempt)
                _check_complete(repo, attempt)
            finally:
                index.close()
                store.close()
            return attempt

        try:
            result, result.reserve_given_up = retry_with_reserve(path, build)
        except BaseException:
            _remove_tree(new_dir)  # a failed build only takes space
            raise
        _swap(path, new_dir)
    result.seconds = time.monotonic() - t0
    return result


def _check_packs_present(path: str) -> None:
    """Refuse to trade an index for an empty one because the packs are not there.

    A ``packs/`` directory that is missing, or holds nothing, is far more
    likely a mistake (a failed copy, the wrong path, an unmounted volume)
    than a repository that really lost every pack; rebuilding then would
    only throw away the index, the one thing left.
    """
    packs_dir = os.path.join(path, PACKS_DIR)
    if not os.path.isdir(packs_dir):
        raise RepositoryError(
            f"{packs_dir}: missing or not a directory: nothing to rebuild the index from "
            "(the index was left as it is)"
        )
    if next(iter(LocalPackStore(packs_dir).list()), None) is not None:
        return
    try:
        index = Index(os.path.join(path, INDEX_DIR))
    except RepofsError:
        return  # no index worth keeping
    try:
        known = index.read(lambda txn: txn.stat(index.dbs["packs"])["entries"])
    except lmdb.Error:
        return
    finally:
        index.close()
    if known:
        index_dir = os.path.join(path, INDEX_DIR)
        raise RepositoryError(
            f"{packs_dir}: holds no packs, but the index lists {known}; the index was left "
            f"as it is (to start an empty index anyway, remove {index_dir} first)"
        )


def _scan_all(
    store: LocalPackStore,
    index: Index,
    config: RepoConfig,
    result: RebuildResult,
    threads: int | None,
    progress: bool | None,
) -> tuple[list[_Found], dict[Any, Any], list[Protection]]:
    pack_ids = list(store.list())
    sizes = {}
    for p in pack_ids:
        try:
            sizes[p] = store.size(p)
        except IntegrityError:  # vanished: scan_pack reports it
            sizes[p] = 0
    bar = Progress(sum(sizes.values()), label="rebuild-index: ", enabled=progress)
    found: list[_Found] = []
    tombs: dict[tuple[str, str, int], int | None] = {}
    flags: list[Protection] = []
    with ThreadPoolExecutor(threads or max(2, os.cpu_count() or 1)) as pool:
        for pack_id in pack_ids:
            name = pack_id.hex()
            scan = scan_pack(store, pack_id, config.repository_id)
            bar.update(sizes[pack_id])
            if scan.skipped is not None:
                result.skipped_packs.append(f"pack {name} {scan.skipped}")
                continue
            result.packs += 1
            result.bytes_scanned += scan.size
            entries: list[tuple[RecordType, bytes, int, int, int]] = []
            for rec, raw, err in check_payloads(scan, pool, _KEEP, keys=index.names):
                h = rec.header
                if err is not None:
                    result.damaged.append(
                        f"pack {name} offset {rec.offset}: "
                        f"{err.split(': ', 1)[-1]} (record dropped)"
                    )
                    continue
                entries.append((h.type, h.digest, rec.offset, h.stored_len, h.raw_len))
                if h.type == RecordType.RESTORE_POINT and raw is not None:
                    doc = parse_rp_record(raw)
                    if doc is None:
                        result.damaged.append(
                            f"pack {name} offset {rec.offset}: restore point "
                            "record is not valid JSON of a restore point"
                        )
                        continue
                    found.append(
                        _Found(doc, Location(pack_id, rec.offset, h.stored_len, h.raw_len))
                    )
                elif h.type == RecordType.TOMBSTONE and raw is not None:
                    t = parse_tombstone(raw)
                    if t is not None:
                        tombs[t.target] = t.vm_seq
                elif h.type == RecordType.PROTECTION and raw is not None:
                    flag = parse_protection(raw)
                    if flag is not None:
                        flags.append(flag)
            for area in scan.damaged:
                result.damaged.append(
                    f"pack {name}: {area.length} bytes at offset {area.offset} "
                    f"skipped: {area.reason}"
                )
            result.records += len(entries)
            index.write(lambda txn, p=pack_id, s=scan.size, e=entries: index.add_pack(txn, p, s, e))
    bar.finish()
    return found, tombs, flags


def _old_restore_points(path: str, keys: Keys) -> list[dict[str, Any]]:
    """The restore points the index being replaced lists, as far as it can still be read."""
    docs: list[dict[str, Any]] = []
    try:
        index = Index(os.path.join(path, INDEX_DIR))
    except RepofsError:  # damaged, missing, or no room for its lock file
        return docs
    index.names = keys
    try:
        with index.reading() as txn:
            for doc in index.rp_docs(txn):
                if parse_rp_record(json.dumps(doc).encode()) is not None:
                    docs.append(doc)
    except (lmdb.Error, ValueError, RepositoryError):
        pass  # keep what was read before the damage (or a value that does not authenticate)
    finally:
        index.close()
    return docs


def _rewrite_lost_records(
    repo: Repository,
    found: list[_Found],
    tombs: dict[Any, Any],
    known: list[dict[str, Any]],
    result: RebuildResult,
) -> list[_Found]:
    """Write again the records of restore points the old index lists but no pack holds.

    A restore point whose record was lost (its pack deleted or damaged)
    while its data survived would otherwise vanish from the rebuilt index
    without a word, and the next gc would free its data.  The old index's
    copy is the same JSON; written into a new pack, it makes the restore
    point whole again, and rebuildable from the packs from now on.
    """
    have = {(f.doc["vm"], f.doc["id"]) for f in found}
    lost = [
        d
        for d in known
        if (d["vm"], d["id"]) not in have and (d["vm"], d["id"], d["seq"]) not in tombs
    ]
    if not lost:
        return []
    out = []
    writer = repo.writer()
    try:
        for doc in lost:
            record = {**doc, "record": None}  # the bytes commit wrote, so gc finds it live
            _digest, loc = writer.put_new(RecordType.RESTORE_POINT, rp_record_body(doc))
            out.append(_Found(record, loc))
        writer.flush()
    except BaseException:
        writer.abort()
        raise
    result.rewritten += [f"{d['vm']}/{d['id']}" for d in lost]
    return out


def _restore_points(
    index: Index,
    found: list[_Found],
    tombs: dict[Any, Any],
    flags: dict[tuple[str, str, int], Protection],
    result: RebuildResult,
) -> None:
    """Index the restore points no tombstone names, with their flags; restore every sequence
    number (those of protection records too: the counter gives them their order)."""
    chosen: dict[tuple[str, str], _Found] = {}
    top = max((f.flag_seq for f in flags.values()), default=0)
    for f in found:
        d = f.doc
        top = max(top, d["seq"], d["vm_seq"])
        if (d["vm"], d["id"], d["seq"]) in tombs:
            result.tombstoned += 1
            continue
        key = (d["vm"], d["id"])
        if key not in chosen or chosen[key].doc["seq"] < d["seq"]:
            chosen[key] = f
    vm_seqs: dict[str, int] = {}
    for (vm, _rp_id, seq), vm_seq in tombs.items():
        top = max(top, seq, vm_seq or 0)
        if vm_seq is not None:
            vm_seqs.setdefault(vm, vm_seq)
    for f in chosen.values():
        vm_seqs[f.doc["vm"]] = f.doc["vm_seq"]  # a live restore point's word wins

    def txn_fn(txn: Any) -> None:
        for (vm, rp_id), f in sorted(chosen.items()):
            doc = dict(f.doc)
            doc["record"] = [f.loc.pack_id.hex(), f.loc.offset]
            flag = flags.get((vm, rp_id, doc["seq"]))
            if flag is not None:
                doc["protected"], doc["protected_seq"] = flag.protected, flag.flag_seq
            index.put_rp(txn, vm, rp_id, doc["seq"], doc)
        for vm, seq in vm_seqs.items():
            index.set_vm_seq(txn, vm, seq)
        index.bump_seq(txn, top + 1)

    index.write(txn_fn)
    result.restore_points = len(chosen)
    result.vms = len({vm for vm, _ in chosen})
    result.next_seq = top + 1


def _check_complete(repo: Repository, result: RebuildResult) -> None:
    """Name restore points whose maps or blobs reach objects no pack holds any more."""
    walker = MapWalker(repo.config.page_refs, lambda d: repo.read_object(RecordType.PAGE, d))
    index = repo.index
    cfg = repo.config
    for rp in repo.restore_points():
        inconsistent = rp.inconsistency(cfg.chunk_size, cfg.page_refs)
        if inconsistent is not None:
            result.incomplete.append(
                f"{rp.vm}/{rp.id}: its record disagrees with its map ({inconsistent}); "
                "reads of its disks fail with EIO"
            )
            continue
        faults_before = len(walker.faults)
        missing = _MissingChunks(index)
        for disk in rp.disks:
            with index.reading() as missing.txn:
                walker.walk(disk.map, missing)
        lost = missing.count + len(walker.faults) - faults_before
        lost += sum(
            1 for c in rp.configs if index.locate(RecordType.BLOB, bytes.fromhex(c.digest)) is None
        )
        if lost:
            result.incomplete.append(
                f"{rp.vm}/{rp.id}: {lost} reference(s) to chunks, pages or config "
                "files that no pack holds; 'repofs verify' shows the byte ranges"
            )


class _MissingChunks:
    """Counts chunk references of level-0 pages that the index lacks."""

    def __init__(self, index: Index) -> None:
        self.index = index
        self.txn: Any = None
        self.count = 0
        self._prefix = bytes((RecordType.CHUNK,))

    def __call__(self, page: bytes, _first: int) -> None:
        for k in range(0, len(page), 32):
            ref = page[k : k + 32]
            if ref == ZERO_DIGEST:
                continue
            if self.index.get(self.txn, "objects", self._prefix + ref) is None:
                self.count += 1


def _remove_tree(path: str) -> None:
    if os.path.lexists(path):
        shutil.rmtree(path, ignore_errors=True)


def _swap(path: str, new_dir: str) -> None:
    """Put ``new_dir`` in place of the index directory atomically, then remove the old one."""
    current = os.path.join(path, INDEX_DIR)
    try:
        if os.path.lexists(current):
            if not _exchange(new_dir, current):
                old = os.path.join(path, f"index.old.{os.getpid()}")
                os.rename(current, old)
                os.rename(new_dir, current)
                new_dir = old
        else:
            os.rename(new_dir, current)
        fsync_dir(path)
    except OSError as exc:
        raise os_error(exc, f"swapping in the rebuilt index at {current}") from None
    _remove_tree(new_dir)  # after an exchange, this is the old index


def _exchange(a: str, b: str) -> bool:
    """``renameat2(a, b, RENAME_EXCHANGE)``; False if this kernel or libc cannot."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except AttributeError:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EPERM):
        return False
    raise OSError(err, os.strerror(err), b)
