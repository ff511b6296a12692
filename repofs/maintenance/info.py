"""``repofs info``: what a repository is (format, chunking, encryption), its size, who uses it.

Cheap by design, so that it answers at once on a large repository and
while gc or an ingest runs: it reads the config, counts restore points in
one LMDB read transaction, sizes the files with ``stat``, and looks at
``/proc/locks`` for the lock holders without taking a lock.  ``stats``
is the command that walks every object for the dedup figures.

A repository in a bucket (:func:`bucket_info`) has no directory to walk:
its counts come from one LIST per kind of object (a page of 1000 names
per request), its leases are read (they are small), and this host's cache
is sized with ``stat`` like a local repository.
"""

from __future__ import annotations

import os
from typing import Any

from repofs.maintenance.gc import GC_LOCK
from repofs.store.location import is_s3
from repofs.store.lock import GATE, KEEP, MAIN, lock_holders
from repofs.store.opening import open_repository
from repofs.store.repository import INDEX_DIR, PACKS_DIR
from repofs.store.reserve import RESERVE_FILE

#: the lock files, in the order they are described (docs/maintenance.md, "Locks")
LOCK_FILES = (MAIN, GATE, GC_LOCK, KEEP)


def _allocated(path: str) -> int:
    """Bytes ``path`` occupies on disk (a sparse LMDB map counts what it uses), 0 if absent."""
    try:
        return os.stat(path).st_blocks * 512
    except OSError:
        return 0


def _tree(path: str, suffix: str = "") -> tuple[int, int, int]:
    """Files ending in ``suffix`` under ``path``: count, apparent bytes, allocated bytes."""
    count = size = allocated = 0
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            if not name.endswith(suffix):
                continue
            try:
                st = os.lstat(os.path.join(dirpath, name))
            except OSError:  # deleted meanwhile by gc
                continue
            count += 1
            size += st.st_size
            allocated += st.st_blocks * 512
    return count, size, allocated


def _config_fields(cfg: Any) -> dict[str, Any]:
    return {
        "format": cfg.format,
        "version": cfg.version,
        "repository_id": cfg.repository_id,
        "chunk_size": cfg.chunk_size,
        "compression": cfg.compression,
        "page_refs": cfg.page_refs,
        "pack_target_size": cfg.pack_target_size,
        "encryption": cfg.cipher,
        "key": cfg.encryption.key if cfg.encryption is not None else None,
    }


def repository_info(path: str) -> dict[str, Any]:
    """The document ``repofs info --json`` prints; the text form shows the same fields."""
    if is_s3(path):
        return bucket_info(path)
    with open_repository(path) as repo:
        cfg = repo.config

        def counts(txn: Any) -> tuple[int, int]:
            return len(repo.index.vm_names(txn)), sum(1 for _ in repo.index.rp_docs(txn))

        vms, rps = repo.index.read(counts)
    pack_count, pack_bytes, _ = _tree(os.path.join(path, PACKS_DIR), ".pack")
    _, _, index_bytes = _tree(os.path.join(path, INDEX_DIR))
    _, _, total_bytes = _tree(path)
    holders = lock_holders(path, LOCK_FILES)
    return {
        "path": os.path.abspath(path),
        **_config_fields(cfg),
        "vms": vms,
        "restore_points": rps,
        "pack_count": pack_count,
        "pack_bytes": pack_bytes,
        "index_bytes": index_bytes,
        "reserve_bytes": _allocated(os.path.join(path, RESERVE_FILE)),
        "total_bytes": total_bytes,
        "locks": None
        if holders is None
        else [
            {
                "file": h.file,
                "mode": h.mode,
                "pid": h.pid,
                "waiting": h.waiting,
                "command": h.command,
            }
            for h in holders
        ],
    }


def bucket_info(url: str) -> dict[str, Any]:
    """``repofs info --json`` of ``s3://...``: the config, the bucket's object counts, this cache.

    The fields of a local repository's document that still mean something
    keep their names (``pack_count``, ``pack_bytes``, ``index_bytes``,
    ``locks``: those of this host's cache); ``path``, ``reserve_bytes`` and
    ``total_bytes`` are left out, the bucket's own fields added.
    """
    import time

    from repofs.store.bucketlog import CHECKPOINT_PREFIX, LOG_PREFIX
    from repofs.store.leases import clock_skew, list_leases
    from repofs.store.s3packs import PACKS_PREFIX

    with open_repository(url) as repo:
        cfg = repo.config

        def counts(txn: Any) -> tuple[int, int]:
            return len(repo.index.vm_names(txn)), sum(1 for _ in repo.index.rp_docs(txn))

        vms, rps = repo.index.read(counts)
        bucket = repo.bucket  # type: ignore[attr-defined]
        packs = list(bucket.list(PACKS_PREFIX))
        logs = list(bucket.list(LOG_PREFIX))
        checkpoints = list(bucket.list(CHECKPOINT_PREFIX))
        now, skew = time.time(), clock_skew()
        leases = [
            {
                "what": lease.what,
                "host": lease.host,
                "pid": lease.pid,
                "started": lease.started,
                "renewed": lease.renewed,
                "alive": lease.alive(now, skew),
            }
            for lease in list_leases(bucket, repo.keys)
        ]
        cache = repo.path
    _, _, cache_bytes = _tree(cache)
    _, _, index_bytes = _tree(os.path.join(cache, INDEX_DIR))
    holders = lock_holders(cache, LOCK_FILES)
    return {
        "url": bucket.location.url,
        "endpoint": bucket.endpoint,
        **_config_fields(cfg),
        "vms": vms,
        "restore_points": rps,
        "pack_count": len(packs),
        "pack_bytes": sum(p.size for p in packs),
        "log_objects": len(logs),
        "commit_objects": sum(1 for i in logs if i.name.startswith(LOG_PREFIX + "c-")),
        "log_bytes": sum(i.size for i in logs),
        "checkpoints": len(checkpoints),
        "checkpoint_bytes": sum(i.size for i in checkpoints),
        "leases": leases,
        "cache_dir": cache,
        "cache_bytes": cache_bytes,
        "index_bytes": index_bytes,
        "locks": None if holders is None else [_holder(h) for h in holders],
    }


def _holder(h: Any) -> dict[str, Any]:
    return {
        "file": h.file,
        "mode": h.mode,
        "pid": h.pid,
        "waiting": h.waiting,
        "command": h.command,
    }
