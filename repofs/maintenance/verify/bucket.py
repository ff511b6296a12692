"""verify of a repository in a bucket, and the cheap ``--sizes-only`` mode of any repository.

A bucket adds what a directory does not have: the log.  A log object that
does not decode is a fact no fresh cache learns (a damaged commit is a
restore point that only hosts which applied it before still see), so both
modes GET and decode every log object and the newest checkpoint; they are
small (a commit is its restore point's JSON and a 49-byte row per new
object).

``--sizes-only`` then downloads no pack: one LIST of ``packs/`` gives every
pack's size, and each pack the index names must be there and at least as
long as the index says.  It finds packs deleted or truncated by a mistake,
a lifecycle rule or a broken replication, in requests proportional to the
number of packs / 1000; it cannot find a flipped byte inside a pack (the
size is unchanged): that is the full verify's re-hash.
"""

from __future__ import annotations

import json
import struct
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

import lmdb

from repofs.errors import IndexAccessError, IntegrityError, RepositoryError
from repofs.maintenance.verify.permissions import permission_warnings
from repofs.maintenance.verify.result import Problem, VerifyResult
from repofs.store.bucket import Bucket, ObjectMissing, ObjectStoreError
from repofs.store.bucketlog import LOG_PREFIX
from repofs.store.config import CONFIG_FILE
from repofs.store.location import parse_s3
from repofs.store.opening import open_repository
from repofs.store.repository import Repository
from repofs.store.schema import decode_pack_info

#: what a damaged LMDB file raises while it is read (as :data:`.checks.INDEX_DAMAGE`)
INDEX_DAMAGE = (lmdb.Error, json.JSONDecodeError, struct.error, UnicodeDecodeError)
#: log objects fetched at once (small objects: the round trip is the cost)
LOG_READERS = 8


class _Runs(Protocol):
    def run(self) -> VerifyResult: ...


def verify_bucket(
    url: str, make_verifier: Callable[[Repository], _Runs], *, sizes_only: bool
) -> VerifyResult:
    """Check the repository at ``url`` (``s3://...``) under a lease; see the module's text."""
    t0 = time.monotonic()
    bucket = Bucket(parse_s3(url))
    if bucket.head(CONFIG_FILE) is None:
        bucket.check()  # "no such bucket" is its own line
        raise RepositoryError(f"{url}: not a repofs repository (no {CONFIG_FILE})")
    try:
        repo = open_repository(url)
    except (ObjectStoreError, IndexAccessError):
        raise
    except (RepositoryError, *INDEX_DAMAGE) as exc:  # this host's cache, not the bucket
        result = _damaged_cache(url, exc, sizes_only)
        result.elapsed = time.monotonic() - t0
        return result
    try:
        # A lease: gc on any host deletes no pack we are about to look at.
        with repo.lock(), repo.lease("verify"):
            if sizes_only:
                result = VerifyResult(mode="sizes")
                stored = check_pack_sizes(repo, result)
                result.warnings.extend(leftover_warnings(repo, stored))
                result.warnings.extend(permission_warnings(repo.path))
            else:
                result = make_verifier(repo).run()
            check_log(repo, result)
    except INDEX_DAMAGE as exc:
        result = _damaged_cache(url, exc, sizes_only)
    finally:
        repo.close()
    result.requests = dict(sorted(repo.bucket.counts.items()))  # type: ignore[attr-defined]
    result.elapsed = time.monotonic() - t0
    return result


def _damaged_cache(url: str, exc: BaseException, sizes_only: bool) -> VerifyResult:
    result = VerifyResult(mode="sizes" if sizes_only else "full")
    result.problems.append(
        Problem(
            "this host's cache of the index",
            f"cannot be used ({exc}); nothing in the bucket is lost: run "
            f"'repofs rebuild-index {url}' to build it again from the bucket's log",
            ["every restore point, on this host only"],
        )
    )
    return result


# -- the log ---------------------------------------------------------------------------


def check_log(repo: Any, result: VerifyResult) -> None:
    """Every log object and the newest checkpoint must decode; name what a damaged one hides."""
    log = repo.log
    names = [info.name for info in log.logs()]
    checkpoints = log.checkpoints()
    if checkpoints:
        names.append(checkpoints[-1].name)

    def decode(name: str) -> str | None:
        try:
            log.read_segment(name)
        except ObjectMissing:
            return None  # gc compacted it into a checkpoint after we listed it
        except IntegrityError as exc:
            return str(exc)
        return None

    with ThreadPoolExecutor(LOG_READERS, thread_name_prefix="repofs-verify-log") as pool:
        failures = list(zip(names, pool.map(decode, names), strict=True))
    result.log_objects = len(names)
    damaged = [(n, err) for n, err in failures if err is not None]
    if not damaged:
        return
    commits = _commit_names(repo)
    for name, err in damaged:
        if name.startswith(LOG_PREFIX + "c-"):
            owner = commits.get(name)
            affects = [
                f"{owner}: still listed by this host's cache, which applied the commit before "
                "the damage; a fresh cache (another host, or rebuild-index) loses it"
                if owner is not None
                else "a restore point this host's cache never applied: no host that has not "
                "applied it sees it"
            ]
            what = "a commit that does not decode"
        elif name.startswith(LOG_PREFIX):
            affects = [
                "its facts (prune, delete, protect or gc results) are lost to every cache that "
                "had not applied them: a removed restore point may reappear there"
            ]
            what = "a log object that does not decode"
        else:
            affects = [
                "a fresh cache falls back to the log objects it covers; those gc already "
                "deleted are lost to it ('repofs rebuild-index' uses an older checkpoint)"
            ]
            what = "the newest checkpoint does not decode"
        result.problems.append(Problem(f"log object {name}", f"{what}: {err}", affects))


def _commit_names(repo: Any) -> dict[str, str]:
    """``vm/id`` by the name its commit object has (a keyed hash: computed, never read)."""
    index = repo.index

    def names(txn: Any) -> dict[str, str]:
        return {
            repo.log.commit_name(doc["vm"], doc["id"]): f"{doc['vm']}/{doc['id']}"
            for doc in index.rp_docs(txn)
        }

    return index.read(names)


# -- pack sizes (the cheap mode) ------------------------------------------------------------


def _store_sizes(repo: Repository) -> dict[bytes, int]:
    """Every pack the store holds, with its size: one LIST of a bucket, a stat per local pack."""
    store = repo.packs
    list_sized = getattr(store, "list_sized", None)
    if list_sized is not None:
        return {pack_id: size for pack_id, size, _mtime in list_sized()}
    out = {}
    for pack_id in store.list():
        try:
            out[pack_id] = store.size(pack_id)
        except IntegrityError:
            continue  # deleted between the listing and the stat: gc
    return out


def check_pack_sizes(repo: Repository, result: VerifyResult) -> dict[bytes, int]:
    """Each pack the index names exists and is at least as long as the index says.

    Returns what the store listed, pack by pack with its size.
    """
    index = repo.index

    def read(txn: Any) -> tuple[dict[bytes, int], dict[bytes, list[str]], int, int]:
        packs = {k: decode_pack_info(v)[0] for k, v in index.items(txn, "packs")}
        records: dict[bytes, list[str]] = {}
        rps = 0
        vms = set()
        for doc in index.rp_docs(txn):
            rps += 1
            vms.add(doc["vm"])
            record = doc.get("record")
            try:
                records.setdefault(bytes.fromhex(record[0]), []).append(
                    f"{doc['vm']}/{doc['id']}"
                )
            except (TypeError, ValueError, IndexError):
                continue
        return packs, records, rps, len(vms)

    packs, records, result.restore_points, result.vms = index.read(read)
    stored = _store_sizes(repo)
    result.packs = len(packs)
    data_note = (
        "the restore points whose data lies in it: 'repofs verify' without --sizes-only "
        "names their disks and byte ranges"
    )
    for pack_id, size in sorted(packs.items()):
        name = pack_id.hex()
        actual = stored.get(pack_id)
        if actual is None:
            message = "is missing"
        elif actual < size:
            message = f"is truncated: {actual} of {size} bytes"
        else:
            if actual > size:
                result.warnings.append(f"pack {name} is {actual} bytes, the index says {size}")
            continue
        own = [f"{rp}: its own record" for rp in records.get(pack_id, [])]
        result.problems.append(Problem(f"pack {name}", message, [*own, data_note]))
    return stored


def leftover_warnings(repo: Repository, stored: dict[bytes, int] | None = None) -> list[str]:
    """Packs in the bucket that no fact introduced: an ingest that never committed (or runs now).

    Unlike a local repository's leftovers they can never hold a committed
    restore point: a restore point exists only by its commit object, which
    names every pack it needs.
    """
    index = repo.index
    known = index.read(
        lambda txn: {k for db in ("packs", "doomed", "retired") for k, _ in index.items(txn, db)}
    )
    out = []
    for pack_id in _store_sizes(repo) if stored is None else stored:
        if pack_id not in known:
            out.append(
                f"pack {pack_id.hex()} is named by no commit (an ingest that is running, or "
                "was killed before its commit; gc removes it after the grace period)"
            )
    return out


__all__ = ["check_log", "check_pack_sizes", "leftover_warnings", "verify_bucket"]
