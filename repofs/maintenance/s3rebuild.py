"""``repofs rebuild-index s3://...``: this host's cache of the index, built again from the bucket.

On a bucket the index is no shared file but each host's cache of the log's
facts, so rebuilding it never needs the packs to say what exists:

* by default, from the newest checkpoint that decodes and every log
  object after it: what a fresh host does at its first command, a few
  GETs of small objects.  A damaged newest checkpoint falls back to the
  one before (gc keeps two); damaged log objects are named and left out;
* with ``--scan-packs``, the same facts, and then every pack they
  introduce is downloaded and read record by record (the local
  rebuild's checks): objects whose record is damaged or whose pack is
  missing are dropped from the cache, so reads of them fail as clean EIO
  and no ingest here deduplicates against them, and restore points that
  lost data are named (``incomplete``, exit 5).

Restore points come only from commit objects (and checkpoints, which
collect them): a restore point record in a pack that no commit names is
an ingest that never committed, and stays invisible.  Sequence numbers
(inode numbers) are hashes of names, so they are the same as before.

The new index is built in ``index.new`` of the cache directory under the
cache's exclusive lock and swapped in like the local rebuild's, so a
mount on this host follows it; the cache directory itself, if deleted,
is made again.
"""

from __future__ import annotations

import itertools
import os
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from repofs.errors import IntegrityError, RepositoryError
from repofs.maintenance.packscan import PackScan, check_payloads, scan_pack
from repofs.maintenance.rebuild import RebuildResult, _check_complete, _remove_tree, _swap
from repofs.store import crypto
from repofs.store.bucket import Bucket, ObjectMissing
from repofs.store.bucketlog import _LOC_TAIL, FETCH_THREADS, LOG_PREFIX, BucketLog
from repofs.store.config import CONFIG_FILE, RepoConfig
from repofs.store.durable import os_error
from repofs.store.index import Index
from repofs.store.location import parse_s3
from repofs.store.lock import repository_lock
from repofs.store.repository import NEW_INDEX_DIR
from repofs.store.s3packs import S3PackStore
from repofs.store.s3repo import S3Repository, _open_cache
from repofs.store.schema import decode_pack_info, key_digest, key_type
from repofs.store.segment import Segment
from repofs.util.progress import Progress

_Loc = tuple[bytes, int, int, int]  #: object key, offset, stored length, raw length
#: packs downloaded at once by --scan-packs (each is held whole in memory: 16-128 MiB)
SCAN_READERS = 3


@dataclass
class BucketRebuildResult(RebuildResult):
    """``rebuild-index --json`` of a bucket: the local fields, and where the facts came from."""

    url: str = ""
    cache_dir: str = ""
    mode: str = "log"  #: "log" (checkpoint + log) or "scan" (``--scan-packs``: packs read too)
    checkpoint: str | None = None  #: the checkpoint applied (None: the log from its start)
    log_objects: int = 0  #: log objects applied after it
    dropped_objects: int = 0  #: ``--scan-packs``: objects left out (damaged, or pack missing)


def rebuild_bucket_index(
    url: str,
    *,
    scan_packs: bool = False,
    threads: int | None = None,
    progress: bool | None = None,
) -> BucketRebuildResult:
    t0 = time.monotonic()
    location = parse_s3(url)
    bucket = Bucket(location)
    try:
        raw = bucket.get(CONFIG_FILE)
    except ObjectMissing:
        bucket.check()
        raise RepositoryError(f"{url}: not a repofs repository (no {CONFIG_FILE})") from None
    config = RepoConfig.parse(raw, f"{url}/{CONFIG_FILE}")
    keys = _keys(url, bucket, config)
    cache = _open_cache(location, config)
    result = BucketRebuildResult(url=location.url, cache_dir=cache)
    result.mode = "scan" if scan_packs else "log"
    with repository_lock(cache, exclusive=True):
        new_dir = os.path.join(cache, NEW_INDEX_DIR)
        _remove_tree(new_dir)
        try:
            os.mkdir(new_dir, 0o700)
        except OSError as exc:
            raise os_error(exc, new_dir) from None
        try:
            index = Index(new_dir, create=True)
            repo = S3Repository(location, bucket, cache, config, index, keys)
            try:
                _apply_log(repo.log, result)
                if scan_packs:
                    _scan_packs(repo, result, threads, progress)
                    _check_complete(repo, result)
                _count(index, result)
            finally:
                repo.close()
        except BaseException:
            _remove_tree(new_dir)  # a failed build only takes space; the old cache stays
            raise
        _swap(cache, new_dir)
    result.seconds = time.monotonic() - t0
    return result


def _keys(url: str, bucket: Bucket, config: RepoConfig) -> crypto.Keys:
    blob = None
    if config.encryption is not None and config.encryption.key == "passphrase":
        try:
            blob = bucket.get(crypto.KEY_FILE)
        except ObjectMissing:
            blob = None
    return crypto.keys_from_key_object(url, blob, config.encryption, config.repository_id)


# -- the facts ------------------------------------------------------------------------------


def _decode(log: BucketLog, name: str, result: RebuildResult) -> Segment | None:
    try:
        return log.read_segment(name)
    except ObjectMissing:
        return None  # gc compacted it after the listing: a newer checkpoint covers it
    except IntegrityError as exc:
        result.damaged.append(f"{name}: {exc} (left out)")
        return None


def _apply_log(log: BucketLog, result: BucketRebuildResult) -> None:
    """The newest checkpoint that decodes, then every log object it does not cover.

    Log objects are fetched in parallel and applied in one transaction (one
    fsync), as a sync does.
    """
    index = log.index
    logs = sorted(info.name for info in log.logs())
    covered: set[str] = set()
    for info in reversed(log.checkpoints()):
        seg = _decode(log, info.name, result)
        if seg is None:
            continue
        index.write(lambda txn, s=seg, n=info.name: log.apply(txn, s, n))
        covered = set(seg.covers)
        result.checkpoint = info.name
        break
    names = [n for n in logs if n not in covered and n.startswith(LOG_PREFIX)]
    with ThreadPoolExecutor(FETCH_THREADS, thread_name_prefix="repofs-rebuild-log") as pool:
        segs = list(pool.map(lambda n: _decode(log, n, result), names))

    def txn_fn(txn: Any) -> None:
        for name, seg in zip(names, segs, strict=True):
            if seg is not None:
                log.apply(txn, seg, name)

    index.write(txn_fn)
    result.log_objects = sum(1 for seg in segs if seg is not None)


def _count(index: Index, result: BucketRebuildResult) -> None:
    def read(txn: Any) -> None:
        result.restore_points = sum(1 for _ in index.rp_docs(txn))
        result.vms = len(index.vm_names(txn))
        result.tombstoned = txn.stat(index.dbs["buried"])["entries"]
        result.records = txn.stat(index.dbs["objects"])["entries"]
        if result.mode == "log":
            result.packs = txn.stat(index.dbs["packs"])["entries"]

    index.read(read)


# -- --scan-packs ---------------------------------------------------------------------------


def _scan_packs(
    repo: S3Repository, result: BucketRebuildResult, threads: int | None, progress: bool | None
) -> None:
    """Read every pack the facts introduce; drop from the cache each object not found whole."""
    index = repo.index
    store: S3PackStore = repo.packs  # type: ignore[assignment]
    listed = {pack_id: size for pack_id, size, _mtime in store.list_sized()}

    def located(txn: Any) -> tuple[dict[bytes, int], dict[bytes, list[_Loc]]]:
        sizes = {k: decode_pack_info(v)[0] for k, v in index.items(txn, "packs")}
        for k, _v in index.items(txn, "doomed"):
            sizes.setdefault(k, 0)
        where: dict[bytes, list[_Loc]] = {}
        for k, tail in index.items(txn, "locs"):  # every location of every object
            offset, stored, raw = _LOC_TAIL.unpack(tail)
            where.setdefault(k[-16:], []).append((k[:-16], offset, stored, raw))
        return sizes, where

    sizes, where = index.read(located)
    for pack_id in sorted(set(listed) - set(sizes) - _retired(index)):
        result.skipped_packs.append(
            f"pack {pack_id.hex()} is named by no commit (an ingest that never committed, or "
            "runs now): not read, and none of its restore point records come back"
        )
    todo = sorted(p for p in sizes if p in listed)
    for pack_id in sorted(set(sizes) - set(listed)):
        lost = where.get(pack_id, [])
        result.skipped_packs.append(
            f"pack {pack_id.hex()} is missing from the bucket: its {len(lost)} object(s) "
            "left out"
        )
        _drop(repo.log, pack_id, lost, result)
    bar = Progress(sum(listed[p] for p in todo), label="rebuild-index: ", enabled=progress)
    repository_id = repo.config.repository_id
    with ThreadPoolExecutor(threads or max(2, os.cpu_count() or 1)) as pool:
        for scan in _scans(store, todo, repository_id):
            bar.update(listed[scan.pack_id])
            name = scan.pack_id.hex()
            if scan.skipped is not None:
                result.skipped_packs.append(f"pack {name} {scan.skipped}")
                _drop(repo.log, scan.pack_id, where.get(scan.pack_id, []), result)
                continue
            result.packs += 1
            result.bytes_scanned += scan.size
            good: set[tuple[int, int, bytes, int, int]] = set()
            for rec, _raw, err in check_payloads(scan, pool, keys=repo.keys):
                h = rec.header
                if err is not None:
                    result.damaged.append(
                        f"pack {name} offset {rec.offset}: {err.split(': ', 1)[-1]} "
                        "(record dropped)"
                    )
                    continue
                good.add((rec.offset, int(h.type), h.digest, h.stored_len, h.raw_len))
            for area in scan.damaged:
                result.damaged.append(
                    f"pack {name}: {area.length} bytes at offset {area.offset} "
                    f"skipped: {area.reason}"
                )
            bad = [
                loc
                for loc in where.get(scan.pack_id, [])
                if (loc[1], key_type(loc[0]), key_digest(loc[0]), loc[2], loc[3]) not in good
            ]
            _drop(repo.log, scan.pack_id, bad, result)
    bar.finish()


def _scans(store: S3PackStore, pack_ids: list[bytes], repository_id: str) -> Iterator[PackScan]:
    """Each pack downloaded whole and parsed, a few downloads in flight, in order."""
    with ThreadPoolExecutor(SCAN_READERS, thread_name_prefix="repofs-rebuild-get") as pool:
        it = iter(pack_ids)
        pending: deque[Future[PackScan]] = deque(
            pool.submit(scan_pack, store, p, repository_id)  # type: ignore[arg-type]
            for p in itertools.islice(it, SCAN_READERS)
        )
        while pending:
            scan = pending.popleft().result()
            nxt = next(it, None)
            if nxt is not None:
                pending.append(pool.submit(scan_pack, store, nxt, repository_id))  # type: ignore[arg-type]
            yield scan


def _drop(log: BucketLog, pack_id: bytes, locs: list[_Loc], result: BucketRebuildResult) -> None:
    """Forget these locations in ``pack_id``: each object then lies where else it does, if any."""
    if not locs:
        return
    index = log.index

    def txn_fn(txn: Any) -> None:
        for key, _offset, _stored, _raw in locs:
            index.delete(txn, "locs", key + pack_id)
        for key in {loc[0] for loc in locs}:
            log._settle(txn, key)

    index.write(txn_fn)
    result.dropped_objects += len(locs)


def _retired(index: Index) -> set[bytes]:
    return index.read(lambda txn: {k for k, _ in index.items(txn, "retired")})

