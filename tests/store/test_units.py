"""In-process tests of the pieces that need no repository on disk."""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ingest.formats.raw import RawSource
from ingest.formats.source import DiskSource
from ingest.plan import Run, chunk_intervals, plan_runs
from repofs.errors import IntegrityError, UsageError
from repofs.store.config import parse_size, size_label
from repofs.store.maps import MapBuilder, MapReader, PageCache
from repofs.store.names import rp_id_for, rp_id_seconds, validate_disk_name, validate_vm_name
from repofs.store.records import (
    RECORD_HEADER_SIZE,
    Codec,
    Compressor,
    RecordType,
    decode_header,
    decode_payload,
    digest_of,
    encode_header,
)
from repofs.store.records import ZERO_DIGEST as Z


class TestNames:
    @pytest.mark.parametrize("bad", ["", ".", "..", "a/b", "a\0b", "x" * 201, "tab\there"])
    def test_bad_vm_names_are_refused(self, bad: str) -> None:
        """Anything that could escape a directory or confuse a reader is refused."""
        with pytest.raises(UsageError):
            validate_vm_name(bad)

    def test_disk_names_must_not_shadow_derived_files(self) -> None:
        """A disk called x.vmdk would collide with the descriptor of disk x."""
        with pytest.raises(UsageError):
            validate_disk_name("x.vmdk")
        assert validate_disk_name("scsi0-0") == "scsi0-0"

    def test_rp_ids_round_trip(self) -> None:
        """Restore point ids are UTC times to the second."""
        assert rp_id_for(0) == "1970-01-01T000000Z"
        assert rp_id_seconds(rp_id_for(1_790_000_000)) == 1_790_000_000


class TestSizes:
    def test_binary_units(self) -> None:
        """Chunk sizes are given as 64K, 1M, or bytes."""
        assert parse_size("64K") == 65536 and parse_size("1M") == 1 << 20
        assert parse_size("4096") == 4096
        with pytest.raises(UsageError):
            parse_size("lots")

    def test_labels_read_back(self) -> None:
        """The CLI shows its default chunk size in the form it accepts."""
        for n in (4096, 65536, 131072, 1 << 20, 4 << 20, 5000):
            assert parse_size(size_label(n)) == n
        assert size_label(131072) == "128K" and size_label(1 << 20) == "1M"


class TestRecords:
    def test_round_trip_and_raw_fallback(self) -> None:
        """Incompressible data is stored raw; both decode to the original bytes."""
        comp = Compressor("zstd", 3)
        for raw in (bytes(1000) + b"x", os.urandom(5000)):
            codec, payload = comp.compress(raw)
            hdr = decode_header(
                encode_header(RecordType.CHUNK, codec, len(payload), len(raw), digest_of(raw)), "t"
            )
            assert decode_payload(hdr, payload, "t") == raw
        assert comp.compress(os.urandom(5000))[0] == Codec.NONE

    def test_flipped_byte_is_detected(self) -> None:
        """A wrong byte anywhere in a record is an IntegrityError, never wrong data."""
        raw = b"hello world" * 100
        codec, payload = Compressor("zstd", 3).compress(raw)
        header = encode_header(RecordType.CHUNK, codec, len(payload), len(raw), digest_of(raw))
        for pos in range(0, len(header) + len(payload), 7):
            blob = bytearray(header + payload)
            blob[pos] ^= 0x40
            with pytest.raises(IntegrityError):
                hdr = decode_header(bytes(blob[:RECORD_HEADER_SIZE]), "t")
                decode_payload(hdr, bytes(blob[RECORD_HEADER_SIZE:]), "t")


def _put_into(store: dict[bytes, bytes]) -> Callable[[bytes], bytes]:
    """A map builder's page store that keeps pages in ``store``."""

    def put(raw: bytes) -> bytes:
        d = digest_of(raw)
        store[d] = raw
        return d

    return put


def _build(refs: list[bytes], page_refs: int, store: dict[bytes, bytes]) -> MapBuilder:
    b = MapBuilder(len(refs), page_refs, _put_into(store))
    for r in refs:
        b.add(r)
    return b


class TestMaps:
    @settings(max_examples=60, deadline=None)
    @given(
        n=st.integers(1, 600),
        page_refs=st.sampled_from([4, 16, 32]),
        zero_frac=st.floats(0, 1),
        seed=st.integers(0, 2**32),
    )
    def test_every_reference_reads_back(
        self, n: int, page_refs: int, zero_frac: float, seed: int
    ) -> None:
        """Whatever the size and zero pattern, the tree returns each chunk's reference."""
        rng = random.Random(seed)
        refs = [Z if rng.random() < zero_frac else rng.randbytes(32) for _ in range(n)]
        store: dict[bytes, bytes] = {}
        root = _build(refs, page_refs, store).finish()
        reader = MapReader(root, page_refs, PageCache(store.__getitem__))
        assert reader.refs(0, n) == refs
        i = rng.randrange(n)
        assert reader.ref_at(i) == refs[i]

    def test_shape_is_canonical(self) -> None:
        """The same content gives the same root, so unchanged pages are shared."""
        refs = [os.urandom(32) for _ in range(100)]
        store: dict[bytes, bytes] = {}
        a = _build(refs, 8, store).finish()
        b = _build(list(refs), 8, store).finish()
        assert a == b
        refs[50] = os.urandom(32)
        before = len(store)
        _build(refs, 8, store).finish()
        assert len(store) - before == 3  # one leaf page, one inner page, a new root

    @settings(max_examples=40, deadline=None)
    @given(n=st.integers(1, 300), seed=st.integers(0, 2**32))
    def test_extend_builds_what_add_builds(self, n: int, seed: int) -> None:
        """References added in runs of any length give the map added one by one."""
        rng = random.Random(seed)
        refs = [rng.randbytes(32) for _ in range(n)]
        store: dict[bytes, bytes] = {}
        one_by_one = _build(refs, 8, store).finish()
        b = MapBuilder(n, 8, _put_into(store))
        i = 0
        while i < n:
            k = rng.randint(0, 30)
            b.extend(refs[i : i + k])
            i += k
        assert b.finish() == one_by_one
        with pytest.raises(ValueError):
            b.extend([Z])

    def test_sparse_disk_costs_no_pages(self) -> None:
        """An all-zero map is the zero reference and stores nothing."""
        store: dict[bytes, bytes] = {}
        b = MapBuilder(1 << 20, 1024, _put_into(store))
        b.add_zeros(1 << 20)
        assert b.finish().root == Z and not store


class TestPlan:
    def test_holes_are_zero_runs(self) -> None:
        """Chunks outside the allocated extents are planned as zeros, never read."""
        alloc = chunk_intervals([(0, 1), (10 * 65536 + 5, 3)], 65536, 100)
        runs = list(plan_runs(100, alloc, None))
        assert runs == [(Run.READ, 0, 1), (Run.ZERO, 1, 9), (Run.READ, 10, 1), (Run.ZERO, 11, 89)]

    def test_changed_list_limits_reads(self) -> None:
        """With a changed list, unchanged chunks come from the parent."""
        runs = list(plan_runs(10, [(0, 10)], [(3, 5)]))
        assert runs == [(Run.PARENT, 0, 3), (Run.READ, 3, 2), (Run.PARENT, 5, 5)]


def test_raw_allocation_of_changed_ranges_matches_the_whole_map(tmp_path: Path) -> None:
    """An incremental asks a raw image about its changed ranges alone, with the same answer.

    The raw reader looks each range up with SEEK_DATA instead of walking the
    whole file; the generic version filters the whole map.
    """
    img = tmp_path / "sparse.img"
    MiB = 1 << 20
    with open(img, "wb") as f:
        f.truncate(64 * MiB)
        for off in (0, 3 * MiB + 4096, 10 * MiB, 11 * MiB, 40 * MiB - 4096):
            f.seek(off)
            f.write(os.urandom(8192))
    ranges = [
        (0, 4096),
        (MiB, 4 * MiB),
        (9 * MiB, 3 * MiB),
        (40 * MiB - 8192, 8192),
        (63 * MiB, 2 * MiB),
    ]  # the last one runs past the end of the file
    with RawSource(str(img)) as src:
        whole = list(DiskSource.allocated_within(src, ranges))  # filters the whole map
        assert list(src.allocated_within(ranges)) == whole
        covered = sum(n for _o, n in whole)
        assert 4096 + 8192 * 3 + 4096 <= covered < 12 * MiB


def test_malloc_tuning_applies_on_glibc() -> None:
    """Debian's glibc takes both thresholds (ingest and the mount daemon call this first)."""
    from repofs.util.malloc import keep_freed_memory

    assert keep_freed_memory() is True


def test_raw_detection_leaves_the_vmdk_reader_unimported(tmp_path: Path) -> None:
    """A disk image with a partition table is raw without importing the VMDK reader (50 ms)."""
    import subprocess
    import sys

    img = tmp_path / "d.img"
    img.write_bytes(b"\xeb\x63\x90" + bytes(507) + b"\x55\xaa" + os.urandom(1 << 16))
    code = (
        "import sys; from ingest.formats.detect import open_source; "
        f"s = open_source({str(img)!r}); print(s.format_name, 'ingest.formats.vmdk' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["raw", "False"]
