"""Packs published in the background while the next fills: same promises as inline publishing."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from repofs.errors import NoSpaceError
from repofs.store.index import Index
from repofs.store.records import Codec, RecordType, digest_of
from repofs.store.repository import Repository
from repofs.store.writer import ObjectWriter


def small_pack_writer(r: Repository) -> ObjectWriter:
    """A writer that closes a pack at 64 KiB, so a few objects fill several packs."""
    cfg = r.config
    return ObjectWriter(
        r.index, r.packs, cfg.repository_id, 64 * 1024, (cfg.codec, cfg.level), r.keys
    )


def test_rotated_packs_are_indexed_and_deduplicated(repo: Path) -> None:
    """Objects of packs still being published count as known; flush leaves all indexed."""
    r = Repository.open(str(repo))
    try:
        w = small_pack_writer(r)
        blobs = [os.urandom(20_000) for _ in range(40)]
        digests = []
        for b in blobs:
            d = r.keys.name(b)  # keyed in an encrypted repository, as put() expects
            digests.append(d)
            w.put(RecordType.CHUNK, d, Codec.NONE, len(b), r.keys.seal(RecordType.CHUNK, d, b))
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
        w = small_pack_writer(r)
        for _ in range(10):
            b = os.urandom(30_000)
            w.put(RecordType.CHUNK, digest_of(b), Codec.NONE, len(b), b)
        w.abort()
        packs = sorted(Path(repo, "packs").glob("*/*.pack"))
        assert len(packs) == len(w.packs_published)
        assert list(Path(repo).rglob("*.tmp")) == []
    finally:
        r.close()


def test_nothing_is_published_after_a_pack_that_could_not_be_indexed(
    repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The restore point record goes into the last pack: when an earlier pack's indexing
    fails, that pack is deleted and no later one is published, so no record outlives its
    data; flush reports the first failure."""
    r = Repository.open(str(repo))
    try:
        w = small_pack_writer(r)
        add_pack = Index.add_pack
        calls = []

        def fail_first(self: Index, *args: Any) -> None:
            calls.append(args[0])
            if len(calls) == 1:
                raise NoSpaceError("no space left on device (test)")
            add_pack(self, *args)

        monkeypatch.setattr(Index, "add_pack", fail_first)
        with pytest.raises(NoSpaceError):  # from a later put, or from flush
            for _ in range(6):  # three packs of two records each
                b = os.urandom(40_000)
                w.put(RecordType.CHUNK, digest_of(b), Codec.NONE, len(b), b)
            w.put_new(RecordType.RESTORE_POINT, b'{"vm": "x"}')
            w.flush()
        w.abort()
        assert len(calls) == 1  # only the first pack got as far as its index write
        assert sorted(Path(repo, "packs").glob("*/*.pack")) == []
        assert list(Path(repo).rglob("*.tmp")) == []
        assert r.index.read(lambda t: list(r.index.items(t, "packs"))) == []
    finally:
        r.close()
