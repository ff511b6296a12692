"""verify without a usable index: name, from the packs, every restore point that is unreadable.

When the index does not open or is damaged no object can be located, so no
check of :mod:`.checks` can run; what remains useful is to say which restore
points exist in the packs (and stay unreadable until ``rebuild-index``).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

from repofs.maintenance.packscan import scan_pack
from repofs.maintenance.verify.permissions import permission_warnings
from repofs.maintenance.verify.result import Problem, VerifyResult
from repofs.store.config import RepoConfig
from repofs.store.crypto import PLAIN, Keys
from repofs.store.packstore import LocalPackStore
from repofs.store.records import RecordType
from repofs.store.repository import PACKS_DIR
from repofs.store.rprecords import parse_rp_record, parse_tombstone


def _without_index(
    path: str, config: RepoConfig, why: str, threads: int | None, keys: Keys = PLAIN
) -> VerifyResult:
    """The index cannot be used: name every restore point the packs hold; none is readable now."""
    from repofs.maintenance.packscan import check_payloads

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
