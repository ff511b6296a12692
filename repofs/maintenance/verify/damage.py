"""Each problem verify found, mapped back to the restore points, disks and byte ranges it harms.

Bad chunks and pages are mapped back through every map that references them
(:class:`repofs.store.mapwalk.DamageMapper`, memoised per page), bad config
blobs to the restore points that name them; what nothing reaches says so.
Apart from the checks because it runs once, after all of them, on what they
collected, and only words the answer.
"""

from __future__ import annotations

from collections.abc import Callable

from repofs.maintenance.verify.result import Problem
from repofs.store.mapwalk import DamageMapper, byte_ranges
from repofs.store.restorepoint import RestorePoint


def map_damage(
    problems: list[Problem],
    new_problem: Callable[[str, str], int],
    rps: list[RestorePoint],
    *,
    page_refs: int,
    chunk_size: int,
    load_page: Callable[[bytes], bytes],
    bad_chunks: dict[bytes, int],
    bad_pages: dict[bytes, int],
    bad_blobs: dict[bytes, int],
    max_ranges: int | None,
) -> None:
    """Add to each of ``problems`` what it affects.

    The ``bad_*`` maps give the problem number of each damaged digest.

    ``new_problem(subject, message)`` adds a problem and returns its number,
    for pages that became unreadable after the checks; ``max_ranges`` byte
    ranges are named per damaged disk (None: all of them).
    """
    if bad_chunks or bad_pages:
        mapper = DamageMapper(page_refs, load_page, bad_chunks, bad_pages)
        unlabelled = -1
        for rp in rps:
            for disk in rp.disks:
                for label, ranges in sorted(mapper.chunk_ranges(disk.map).items()):
                    if label == unlabelled:
                        label = unlabelled = new_problem(
                            "map pages", "became unreadable while verify ran"
                        )
                    spans = byte_ranges(ranges, chunk_size, disk.capacity)
                    limit = len(spans) if max_ranges is None else max_ranges
                    shown = ", ".join(f"{a}-{b - 1}" for a, b in spans[:limit])
                    more = (
                        f" and {len(spans) - limit} more ranges (--all-ranges names them)"
                        if len(spans) > limit
                        else ""
                    )
                    problems[label].affects.append(
                        f"{rp.vm}/{rp.id} {disk.name}-flat.vmdk bytes {shown}{more}"
                    )
    for digest, label in bad_blobs.items():
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
