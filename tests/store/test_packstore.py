"""The local pack store under concurrent readers: every read returns its own pack's bytes."""

from __future__ import annotations

import os
import random
import sys
import threading
import time
from pathlib import Path

import pytest

from repofs.errors import IntegrityError
from repofs.store.packstore import LocalPackStore

PACK_BYTES = 64 * 1024


def _fill(store: LocalPackStore, count: int) -> dict[bytes, bytes]:
    """``count`` published packs, each of a content no other pack shares at any offset."""
    packs = {}
    for n in range(count):
        sink = store.create()
        # 4-byte words "pack number, word number": any misdirected read compares unequal.
        data = b"".join(n.to_bytes(2, "big") + w.to_bytes(2, "big") for w in range(PACK_BYTES // 4))
        sink.append(data)
        sink.publish()
        packs[sink.pack_id] = data
    return packs


class TestDescriptorCache:
    def test_reads_under_eviction_return_their_own_packs_bytes(self, tmp_path: Path) -> None:
        """Ten threads reading 96 packs through a 4-descriptor cache never get another's bytes."""
        root = tmp_path / "packs"
        (root / "tmp").mkdir(parents=True)
        store = LocalPackStore(str(root))
        store.MAX_FDS = 4  # evict on nearly every read
        packs = _fill(store, 96)
        ids = list(packs)
        wrong: list[str] = []
        reads = [0]
        stop = threading.Event()
        deadline = time.monotonic() + 3.0

        def reader(seed: int) -> None:
            rnd = random.Random(seed)
            while not stop.is_set() and time.monotonic() < deadline:
                pack_id = rnd.choice(ids)
                offset = rnd.randrange(0, PACK_BYTES - 64, 4)
                length = rnd.randrange(4, 64, 4)
                try:
                    data = store.read(pack_id, offset, length)
                except IntegrityError as exc:  # EBADF of a descriptor closed under the read
                    wrong.append(str(exc))
                    stop.set()
                    return
                reads[0] += 1
                if data != packs[pack_id][offset : offset + length]:
                    wrong.append(f"pack {pack_id.hex()} offset {offset}: another pack's bytes")
                    stop.set()
                    return

        switch = sys.getswitchinterval()
        sys.setswitchinterval(1e-6)  # switch threads often: the race needs a switch mid-read
        try:
            threads = [threading.Thread(target=reader, args=(k,)) for k in range(10)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        finally:
            sys.setswitchinterval(switch)
            store.close()
        assert not wrong, f"after {reads[0]} reads: {wrong[0]}"
        assert reads[0] > 1000

    def test_forget_and_close_wait_for_reads_in_flight(self, tmp_path: Path) -> None:
        """A descriptor that forget() or close() drops stays open until its read is done."""
        root = tmp_path / "packs"
        (root / "tmp").mkdir(parents=True)
        store = LocalPackStore(str(root))
        packs = _fill(store, 2)
        first, second = packs
        with store.using(first) as fd:
            store.forget(first)
            store.close()
            assert os.pread(fd, 4, 0) == packs[first][:4]  # still ours, not closed under us
        with pytest.raises(OSError):
            os.fstat(fd)  # released by the last user
        assert store.read(second, 4, 4) == packs[second][4:8]
