"""Packs published in the background while the next fills: same promises as inline publishing."""

from __future__ import annotations

import os
from pathlib import Path

from repofs.records import Codec, RecordType, digest_of
from repofs.repository import Repository
from repofs.writer import ObjectWriter


def test_rotated_packs_are_indexed_and_deduplicated(repo: Path) -> None:
    """Objects of packs still being published count as known; flush leaves all indexed."""
    r = Repository.open(str(repo))
    try:
        cfg = r.config
        w = ObjectWriter(r.index, r.packs, cfg.repository_id, 64 * 1024, (cfg.codec, cfg.level))
        blobs = [os.urandom(20_000) for _ in range(40)]
        digests = []
        for b in blobs:
            d = digest_of(b)
            digests.append(d)
            w.put(RecordType.CHUNK, d, Codec.NONE, len(b), b)
            assert w.known(RecordType.CHUNK, d)  # in a pack being written or published
        assert all(w.known(RecordType.CHUNK, d) for d in digests)
        w.flush()
        assert not w.pending
        packs = sorted(Path(repo, "packs").glob("*/*.pack"))
        assert len(packs) == len(w.packs_published) >= 10
        for d, b in zip(digests, blobs, strict=True):
            assert r.read_object(RecordType.CHUNK, d) == b
        assert list(Path(repo).rglob("*.tmp")) == []
    finally:
        r.close()


def test_abort_waits_for_publications_and_drops_the_open_pack(repo: Path) -> None:
    """After abort nothing is half-written: published packs are whole, the open one is gone."""
    r = Repository.open(str(repo))
    try:
        cfg = r.config
        w = ObjectWriter(r.index, r.packs, cfg.repository_id, 64 * 1024, (cfg.codec, cfg.level))
        for _ in range(10):
            b = os.urandom(30_000)
            w.put(RecordType.CHUNK, digest_of(b), Codec.NONE, len(b), b)
        w.abort()
        packs = sorted(Path(repo, "packs").glob("*/*.pack"))
        assert len(packs) == len(w.packs_published)
        assert list(Path(repo).rglob("*.tmp")) == []
    finally:
        r.close()
