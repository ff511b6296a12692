"""Changed-block lists: JSON forms, qemu bitmaps (real qemu tools), chunk arithmetic."""

from __future__ import annotations

import codecs
import hashlib
import json
import os
import random
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ingest.cbt.blocks import ChangedBlocks, sample_unchanged_chunks
from ingest.cbt.load import load_changed_blocks
from repofs.errors import SourceError

KiB = 1024
MiB = 1024 * KiB
CAP = 8 * MiB


def write(tmp_path: Path, doc: Any, name: str = "cbt.json") -> str:
    path = tmp_path / name
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    return str(path)


def load_doc(tmp_path: Path, doc: Any, capacity: int = CAP) -> ChangedBlocks:
    return load_changed_blocks(write(tmp_path, doc), capacity, None)


def assert_error(tmp_path: Path, doc: Any, match: str, capacity: int = CAP) -> str:
    path = write(tmp_path, doc)
    with pytest.raises(SourceError, match=match) as info:
        load_changed_blocks(path, capacity, None)
    msg = str(info.value)
    assert msg.startswith(path + ": "), msg
    assert "\n" not in msg
    return msg


# -- ChangedBlocks -------------------------------------------------------------


def test_sorts_and_merges_overlapping_and_touching_extents() -> None:
    cb = ChangedBlocks(1000, [(500, 10), (0, 10), (5, 10), (15, 5), (505, 100), (900, 100)])
    assert cb.extents == [(0, 20), (500, 105), (900, 100)]
    assert list(cb) == [(0, 20), (500, 105), (900, 100)]
    assert len(cb) == 3
    assert cb.changed_bytes == 225
    assert cb == ChangedBlocks(1000, [(900, 100), (500, 105), (0, 20)])
    assert cb != ChangedBlocks(1001, [(900, 100), (500, 105), (0, 20)])


def test_constructor_rejects_bad_extents_as_bugs() -> None:
    for bad in [(0, 0), (-1, 5), (990, 11)]:
        with pytest.raises(ValueError):
            ChangedBlocks(1000, [bad])
    with pytest.raises(ValueError):
        ChangedBlocks(-1)


def test_round_out_at_chunk_boundaries() -> None:
    c = 64 * KiB
    cb = ChangedBlocks(
        10 * c + 100,
        [
            (0, c),  # exactly one chunk
            (2 * c - 1, 2),  # straddles the 1|2 boundary
            (4 * c + 10, 10),  # inside chunk 4 ...
            (4 * c + 100, 10),  # ... twice: one chunk
            (6 * c, 1),  # first byte of chunk 6
            (8 * c - 1, 1),  # last byte of chunk 7: merges with 6
            (10 * c + 50, 1),  # the last, partial chunk
        ],
    )
    r = cb.round_out(c)
    assert r.extents == [(0, 3 * c), (4 * c, c), (6 * c, 2 * c), (10 * c, 100)]
    assert r.capacity == cb.capacity
    assert list(cb.chunk_ranges(c)) == [(0, 3), (4, 5), (6, 8), (10, 11)]
    assert list(cb.chunk_indexes(c)) == [0, 1, 2, 4, 6, 7, 10]
    assert cb.changed_chunks(c) == 7
    assert cb.chunk_count(c) == 11
    assert [i for i in range(11) if cb.contains_chunk(i, c)] == [0, 1, 2, 4, 6, 7, 10]
    assert r.round_out(c) == r
    with pytest.raises(IndexError):
        cb.contains_chunk(11, c)
    with pytest.raises(ValueError):
        cb.round_out(0)


def test_large_disk_with_a_million_extents_is_handled_by_extent() -> None:
    capacity = 2 << 40  # 2 TiB
    n = 1_000_000
    step = capacity // n
    extents = [(i * step + (i % 7) * 4096, 4096 * (1 + i % 5)) for i in range(n)]
    started = time.monotonic()
    cb = ChangedBlocks(capacity, extents)
    del extents
    rounded = cb.round_out(64 * KiB)
    assert len(rounded) == n
    assert cb.contains_chunk((500_000 * step) // (64 * KiB), 64 * KiB)
    picked = sample_unchanged_chunks(cb, 64 * KiB, capacity, 100, random.Random(7))
    assert len(picked) == 100
    assert not any(cb.contains_chunk(i, 64 * KiB) for i in picked)
    assert time.monotonic() - started < 20


# -- sampling --------------------------------------------------------------------


def test_sampling_returns_only_unchanged_distinct_sorted_chunks() -> None:
    cb = ChangedBlocks(100 * 512, [(0, 512), (10 * 512, 20 * 512), (99 * 512, 1)])
    rng = random.Random(1)
    picked = sample_unchanged_chunks(cb, 512, cb.capacity, 50, rng)
    assert len(picked) == 50 == len(set(picked))
    assert picked == sorted(picked)
    assert not any(cb.contains_chunk(i, 512) for i in picked)
    everything = sample_unchanged_chunks(cb, 512, cb.capacity, 1000, rng)
    assert everything == [i for i in range(100) if not cb.contains_chunk(i, 512)]
    assert sample_unchanged_chunks(cb, 512, cb.capacity, 0, rng) == []
    full = ChangedBlocks(1000, [(0, 1000)])
    assert sample_unchanged_chunks(full, 512, 1000, 5, rng) == []
    with pytest.raises(ValueError):
        sample_unchanged_chunks(cb, 512, cb.capacity + 1, 5, rng)


def test_chunk_ranges_make_the_list_an_ingest_reads() -> None:
    """The chunk ranges an ingest reads become a list whose unchanged chunks are the rest."""
    cb = ChangedBlocks.from_chunk_ranges(10 * 512 + 100, [(3, 5), (0, 1), (10, 11)], 512)
    assert cb.extents == [(0, 512), (3 * 512, 2 * 512), (10 * 512, 100)]
    assert list(cb.unchanged_chunk_ranges(512)) == [(1, 3), (5, 10)]
    picked = sample_unchanged_chunks(cb, 512, cb.capacity, 100, random.Random(2))
    assert picked == [1, 2, 5, 6, 7, 8, 9]


def test_sampling_is_uniform_over_unchanged_chunks() -> None:
    cb = ChangedBlocks(100, [(0, 10), (40, 20), (95, 5)])  # 65 unchanged chunks of 1 byte
    rng = random.Random(42)
    counts = dict.fromkeys(range(100), 0)
    rounds = 2000
    for _ in range(rounds):
        for i in sample_unchanged_chunks(cb, 1, 100, 10, rng):
            counts[i] += 1
    unchanged = [i for i in range(100) if not cb.contains_chunk(i, 1)]
    assert len(unchanged) == 65
    expected = rounds * 10 / 65  # about 308
    assert all(0.75 * expected < counts[i] < 1.25 * expected for i in unchanged)
    assert all(counts[i] == 0 for i in range(100) if i not in unchanged)


# -- property tests ----------------------------------------------------------------


@st.composite
def lists(draw: st.DrawFn) -> ChangedBlocks:
    capacity = draw(st.integers(1, 5000))
    raw = draw(
        st.lists(
            st.integers(0, capacity - 1).flatmap(
                lambda off: st.tuples(st.just(off), st.integers(1, capacity - off))
            ),
            max_size=20,
        )
    )
    return ChangedBlocks(capacity, raw)


@settings(max_examples=200, deadline=None)
@given(cb=lists(), chunk=st.integers(1, 700))
def test_round_out_covers_aligns_sorts_and_separates(cb: ChangedBlocks, chunk: int) -> None:
    changed = {b for off, length in cb for b in range(off, off + length)}
    r = cb.round_out(chunk)
    covered = {b for off, length in r for b in range(off, off + length)}
    assert changed <= covered
    prev_end = -1
    for off, length in r:
        end = off + length
        assert off % chunk == 0
        assert end % chunk == 0 or end == cb.capacity
        assert 0 <= off < end <= cb.capacity
        assert off > prev_end  # sorted, and merged when touching
        prev_end = end
    # Nothing beyond the chunks that hold a changed byte.
    assert covered == {
        b
        for i in {x // chunk for x in changed}
        for b in range(i * chunk, min(cb.capacity, (i + 1) * chunk))
    }
    assert list(cb.chunk_indexes(chunk)) == sorted({x // chunk for x in changed})
    assert cb.changed_bytes == len(changed)


@settings(max_examples=200, deadline=None)
@given(cb=lists(), chunk=st.integers(1, 700), n=st.integers(0, 30), seed=st.integers())
def test_sampling_never_returns_a_changed_chunk(
    cb: ChangedBlocks, chunk: int, n: int, seed: int
) -> None:
    picked = sample_unchanged_chunks(cb, chunk, cb.capacity, n, random.Random(seed))
    unchanged = [i for i in range(cb.chunk_count(chunk)) if not cb.contains_chunk(i, chunk)]
    assert len(picked) == len(set(picked)) == min(n, len(unchanged))
    assert set(picked) <= set(unchanged)


# -- repofs JSON ---------------------------------------------------------------------


def test_repofs_json_sorted_merged(tmp_path: Path) -> None:
    cb = load_doc(
        tmp_path,
        {
            "block_size": 65536,
            "capacity": CAP,
            "extents": [[3 * MiB, 65536], [MiB, 131072], [MiB + 65536, 65536], [0, 65536]],
        },
    )
    assert cb.extents == [(0, 65536), (MiB, 131072), (3 * MiB, 65536)]
    assert cb.capacity == CAP
    assert cb.granularity == 65536
    assert cb.origin == "repofs-json"


def test_repofs_json_without_changes(tmp_path: Path) -> None:
    cb = load_doc(tmp_path, {"block_size": 512, "extents": []})
    assert cb.extents == [] and cb.changed_bytes == 0


def test_repofs_json_last_partial_block_is_clipped(tmp_path: Path) -> None:
    cap = 1000448  # 15 blocks of 64 KiB and 17408 bytes
    whole = {"block_size": 65536, "extents": [[983040, 65536]]}
    assert load_doc(tmp_path, whole, cap).extents == [(983040, 17408)]
    exact = {"block_size": 65536, "extents": [[983040, 17408]]}
    assert load_doc(tmp_path, exact, cap).extents == [(983040, 17408)]


def test_repofs_json_accepts_bom_and_utf16(tmp_path: Path) -> None:
    text = json.dumps({"block_size": 512, "extents": [[512, 512]]})
    for data in (codecs.BOM_UTF8 + text.encode(), codecs.BOM_UTF16_LE + text.encode("utf-16-le")):
        path = tmp_path / "bom.json"
        path.write_bytes(data)
        assert load_changed_blocks(str(path), CAP, None).extents == [(512, 512)]


@pytest.mark.parametrize(
    ("doc", "match"),
    [
        ("", "is empty"),
        ("  \n", "is empty"),
        ('{"block_size": 512, "extents": [', "malformed JSON at line 1"),
        ('{"block_size": 512, "extents": [[0, NaN]]}', "malformed JSON"),
        ('{"block_size": 512, "block_size": 512, "extents": []}', "duplicate key"),
        ([], "empty list"),
        (42, "neither a repofs"),
        ({}, "neither a repofs"),
        ({"foo": 1}, "neither a repofs"),
        ({"block_size": 512, "extents": [], "startOffset": 0}, "both"),
        ({"extents": []}, "missing 'block_size'"),
        ({"block_size": 512}, "missing 'extents'"),
        ({"block_size": 512, "extents": [], "capcity": 1}, "unknown key 'capcity'"),
        ({"block_size": 1000, "extents": []}, "not a power of two"),
        ({"block_size": 256, "extents": []}, "not a power of two of at least 512"),
        ({"block_size": 0, "extents": []}, "not a power of two"),
        ({"block_size": 512.0, "extents": []}, "block_size must be an integer"),
        ({"block_size": "512", "extents": []}, "block_size must be an integer"),
        ({"block_size": True, "extents": []}, "block_size must be an integer"),
        ({"block_size": 512, "extents": [], "capacity": 4096}, "disk of 4096 bytes"),
        ({"block_size": 512, "extents": {}}, "extents must be a list"),
        ({"block_size": 512, "extents": [[0, 512, 3]]}, r"extents\[0\] must be an \[offset"),
        ({"block_size": 512, "extents": [{"offset": 0}]}, r"extents\[0\] must be an \[offset"),
        ({"block_size": 512, "extents": [[0, 512], [1.5, 512]]}, r"extents\[1\] offset must be"),
        ({"block_size": 512, "extents": [[0, "512"]]}, r"extents\[0\] length must be an int"),
        ({"block_size": 512, "extents": [[0, False]]}, r"extents\[0\] length must be an int"),
        ({"block_size": 512, "extents": [[-512, 512]]}, "offset -512 is negative"),
        ({"block_size": 512, "extents": [[0, 0]]}, "length 0 is not positive"),
        ({"block_size": 512, "extents": [[512, -512]]}, "length -512 is not positive"),
        ({"block_size": 512, "extents": [[CAP, 512]]}, "beyond the end of the disk"),
        ({"block_size": 512, "extents": [[CAP - 512, 1024]]}, "beyond the end of the disk"),
        ({"block_size": 512, "extents": [[2048, 512], [100, 512]]}, "offset 100 is not a mult"),
        ({"block_size": 4096, "extents": [[0, 512]]}, "length 512 is not a multiple"),
    ],
)
def test_repofs_json_errors(tmp_path: Path, doc: Any, match: str) -> None:
    assert_error(tmp_path, doc, match)


def test_unreadable_files(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.json")
    with pytest.raises(SourceError, match=f"^{missing}: changed-block list does not exist"):
        load_changed_blocks(missing, CAP, None)
    with pytest.raises(SourceError, match="is a directory, not a changed-block list"):
        load_changed_blocks(str(tmp_path), CAP, None)
    bad = tmp_path / "bad.json"
    bad.write_bytes(b'{"block_size": 512, "extents": [], "x": "\xff\xfe\xff"}')
    with pytest.raises(SourceError, match="not UTF-8"):
        load_changed_blocks(str(bad), CAP, None)


# -- VMware JSON -----------------------------------------------------------------------


def test_vmware_single_result(tmp_path: Path) -> None:
    doc = {
        "startOffset": 0,
        "length": CAP,
        "changedArea": [{"start": MiB, "length": 65536}, {"start": 4096, "length": 512}],
    }
    cb = load_doc(tmp_path, doc)
    assert cb.extents == [(4096, 512), (MiB, 65536)]
    assert cb.origin == "vmware-json"


def test_vmware_paged_results_are_merged(tmp_path: Path) -> None:
    half = CAP // 2
    pages = [
        # Out of order, with an area ending exactly where the next page starts.
        {"startOffset": half, "length": half, "changedArea": [{"start": half, "length": 4096}]},
        {
            "startOffset": 0,
            "length": half,
            "changedArea": [{"start": half - 4096, "length": 4096}, {"start": 0, "length": 512}],
        },
    ]
    cb = load_doc(tmp_path, pages)
    assert cb.extents == [(0, 512), (half - 4096, 8192)]


def test_vmware_api_shapes_and_unknown_keys(tmp_path: Path) -> None:
    pyvmomi = {
        "_vimtype": "vim.vm.DiskChangeInfo",
        "startOffset": 0,
        "length": CAP,
        "changedArea": [
            {"_vimtype": "vim.vm.DiskChangeInfo.DiskChangeExtent", "start": 0, "length": 512}
        ],
        "dynamicProperty": [],
    }
    assert load_doc(tmp_path, pyvmomi).extents == [(0, 512)]
    vijson = {
        "_typeName": "DiskChangeInfo",
        "startOffset": 0,
        "length": CAP,
        "changedArea": [{"_typeName": "DiskChangeExtent", "start": 512, "length": 512}],
    }
    assert load_doc(tmp_path, vijson).extents == [(512, 512)]
    powercli = {"StartOffset": 0, "Length": CAP, "ChangedArea": [{"Start": 0, "Length": 1024}]}
    assert load_doc(tmp_path, powercli).extents == [(0, 1024)]
    no_changes = {"startOffset": 0, "length": CAP}
    assert load_doc(tmp_path, no_changes).extents == []


def page(start: int = 0, length: int = CAP, areas: Any = None) -> dict[str, Any]:
    return {"startOffset": start, "length": length, "changedArea": areas or []}


@pytest.mark.parametrize(
    ("doc", "match"),
    [
        (page(length=CAP // 2), "uncovered from byte 4194304"),
        ([page(0, MiB), page(2 * MiB, CAP - 2 * MiB)], f"uncovered from byte {MiB}"),
        (page(length=CAP + 512), "beyond the end of the disk"),
        (page(start=-1), "negative"),
        (page(areas=[{"start": CAP - 512, "length": 1024}]), "outside its result's range"),
        ([page(0, MiB, [{"start": MiB, "length": 512}]), page(MiB, CAP - MiB)], "outside its"),
        (page(areas=[{"start": 0, "length": 0}]), "length 0 is not positive"),
        (page(areas=[{"start": 0, "length": -5}]), "length -5 is not positive"),
        (page(areas=[{"start": 0.0, "length": 512}]), "start must be an integer"),
        (page(areas=[{"start": 0}]), "missing 'length'"),
        (page(areas=["VMware.Vim.DiskChangeExtent"]), "ConvertTo-Json needs -Depth"),
        (page(areas=[[0, 512]]), "must be an object"),
        ({"startOffset": 0, "changedArea": []}, "missing 'length'"),
        ({"startOffset": "0", "length": CAP}, "startOffset must be an integer"),
        ({**page(), "changedArea": {}}, "changedArea must be a list"),
        ({**page(), "_vimtype": "vim.vm.device.VirtualDisk"}, "not a DiskChangeInfo"),
        ({**page(), "Length": CAP}, "twice in different case"),
        ([page(), 7], r"result \[1\] must be a QueryChangedDiskAreas"),
    ],
)
def test_vmware_errors(tmp_path: Path, doc: Any, match: str) -> None:
    assert_error(tmp_path, doc, match)


# -- qemu bitmaps (real qemu tools) --------------------------------------------------

needs_qemu = pytest.mark.skipif(
    not all(shutil.which(t) for t in ("qemu-img", "qemu-io", "qemu-nbd")),
    reason="qemu-img, qemu-io and qemu-nbd (Debian qemu-utils) are required",
)


def run(*cmd: str | Path) -> None:
    subprocess.run([str(c) for c in cmd], check=True, capture_output=True)


@pytest.fixture
def private_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Send the loader's temporary files to a directory the test can inspect."""
    d = tmp_path / "t"
    d.mkdir()
    monkeypatch.setattr("tempfile.tempdir", str(d))
    return d


def assert_cleaned_up(private_tmp: Path) -> None:
    assert list(private_tmp.iterdir()) == []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmdline = (proc / "cmdline").read_bytes()
            except OSError:
                continue
            assert str(private_tmp).encode() not in cmdline, cmdline


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "d.qcow2"
    run("qemu-img", "create", "-f", "qcow2", path, "8M")
    run("qemu-img", "bitmap", "--add", path, "b0")
    run("qemu-img", "bitmap", "--add", "-g", "4096", path, "fine")
    run("qemu-io", "-c", "write -P 1 1M 64k", "-c", "write 3M 4k", path)
    return path


@needs_qemu
def test_qemu_bitmap_extents_are_what_was_written(image: Path, private_tmp: Path) -> None:
    before = hashlib.sha256(image.read_bytes()).digest()
    cb = load_changed_blocks("qemu-bitmap:b0", CAP, str(image))
    # Default granularity 64 KiB: the 4 KiB write marks its whole granule.
    assert cb.extents == [(MiB, 64 * KiB), (3 * MiB, 64 * KiB)]
    assert cb.granularity == 64 * KiB
    assert cb.origin == "qemu-bitmap:b0"
    fine = load_changed_blocks("qemu-bitmap:fine", CAP, str(image))
    assert fine.extents == [(MiB, 64 * KiB), (3 * MiB, 4 * KiB)]
    assert fine.granularity == 4 * KiB
    assert hashlib.sha256(image.read_bytes()).digest() == before  # read-only
    assert_cleaned_up(private_tmp)


@needs_qemu
def test_qemu_bitmap_relative_path_and_partial_last_granule(
    tmp_path: Path, private_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    run("qemu-img", "create", "-f", "qcow2", "./odd:name.qcow2", "1000448")
    run("qemu-img", "bitmap", "--add", "./odd:name.qcow2", "b")
    run("qemu-io", "-c", "write 990000 100", "-c", "write 0 1", "./odd:name.qcow2")
    cb = load_changed_blocks("qemu-bitmap:b", 1000448, "odd:name.qcow2")
    assert cb.extents == [(0, 65536), (983040, 17408)]
    assert_cleaned_up(private_tmp)


@needs_qemu
def test_qemu_disabled_bitmap_keeps_changes_until_it_was_disabled(
    image: Path, private_tmp: Path
) -> None:
    run("qemu-img", "bitmap", "--disable", image, "b0")
    run("qemu-io", "-c", "write 5M 64k", image)
    frozen = load_changed_blocks("qemu-bitmap:b0", CAP, str(image))
    assert frozen.extents == [(MiB, 64 * KiB), (3 * MiB, 64 * KiB)]
    live = load_changed_blocks("qemu-bitmap:fine", CAP, str(image))
    assert live.extents == [(MiB, 64 * KiB), (3 * MiB, 4 * KiB), (5 * MiB, 64 * KiB)]


@needs_qemu
def test_qemu_missing_bitmap_lists_the_available_ones(image: Path, private_tmp: Path) -> None:
    with pytest.raises(SourceError, match=r"no persistent dirty bitmap 'b9'; it has 'b0', 'fine'"):
        load_changed_blocks("qemu-bitmap:b9", CAP, str(image))
    bare = image.parent / "bare.qcow2"
    run("qemu-img", "create", "-f", "qcow2", bare, "8M")
    with pytest.raises(SourceError, match="it has no persistent bitmaps"):
        load_changed_blocks("qemu-bitmap:b0", CAP, str(bare))
    assert_cleaned_up(private_tmp)


@needs_qemu
def test_qemu_bitmap_errors(image: Path, tmp_path: Path, private_tmp: Path) -> None:
    raw = tmp_path / "d.raw"
    raw.write_bytes(bytes(CAP))
    with pytest.raises(SourceError, match=rf"^{raw}: qemu-bitmap:b0 needs a qcow2 image.*raw$"):
        load_changed_blocks("qemu-bitmap:b0", CAP, str(raw))
    with pytest.raises(SourceError, match="the image is 8388608 bytes, but the disk has 4096"):
        load_changed_blocks("qemu-bitmap:b0", 4096, str(image))
    with pytest.raises(SourceError, match="No such file"):
        load_changed_blocks("qemu-bitmap:b0", CAP, str(tmp_path / "nope.qcow2"))
    with pytest.raises(SourceError, match="needs a qcow2 source or an NBD URI"):
        load_changed_blocks("qemu-bitmap:b0", CAP, None)
    with pytest.raises(SourceError, match="no bitmap name"):
        load_changed_blocks("qemu-bitmap:", CAP, str(image))
    assert_cleaned_up(private_tmp)


@needs_qemu
def test_qemu_bitmap_left_in_use_by_a_crash_is_refused(image: Path, private_tmp: Path) -> None:
    # A writer that dies without closing the image leaves its bitmaps "in-use":
    # qemu sets the flag when it opens the image for writing.
    writer = subprocess.Popen(
        ["qemu-io", "-c", "write 6M 4k", "-c", "sleep 60000", str(image)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            info = subprocess.run(
                ["qemu-img", "info", "-U", "--output=json", str(image)],
                check=True,
                capture_output=True,
            ).stdout
            if b"in-use" in info:
                break
            assert writer.poll() is None and time.monotonic() < deadline
            time.sleep(0.02)
    finally:
        writer.kill()
        writer.wait()
    with pytest.raises(SourceError, match="'b0' is in use or inconsistent"):
        load_changed_blocks("qemu-bitmap:b0", CAP, str(image))
    assert_cleaned_up(private_tmp)


@pytest.fixture
def nbd_export(image: Path, tmp_path: Path) -> Any:
    """A persistent qemu-nbd serving the image with bitmap b0, as a running VM would."""
    sock = tmp_path / "vm.sock"
    pidfile = tmp_path / "vm.pid"
    proc = subprocess.Popen(
        [
            *("qemu-nbd", "-r", "-t", "-f", "qcow2", "-B", "b0", "-x", "vda"),
            *("-k", str(sock), "--pid-file", str(pidfile), str(image)),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while not pidfile.exists():
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.01)
    yield f"nbd+unix:///vda?socket={sock}"
    proc.terminate()
    proc.wait()


@needs_qemu
def test_qemu_bitmap_from_nbd_uri(nbd_export: str) -> None:
    cb = load_changed_blocks("qemu-bitmap:b0", CAP, nbd_export)
    assert cb.extents == [(MiB, 64 * KiB), (3 * MiB, 64 * KiB)]
    # Read twice: the export stays usable for the backup read itself.
    assert load_changed_blocks("qemu-bitmap:b0", CAP, nbd_export) == cb
    with pytest.raises(SourceError, match="does not offer dirty bitmap 'fine'; it exports 'b0'"):
        load_changed_blocks("qemu-bitmap:fine", CAP, nbd_export)
    with pytest.raises(SourceError, match="the bitmap covers 8388608 bytes, but the disk has 4096"):
        load_changed_blocks("qemu-bitmap:b0", 4096, nbd_export)
    with pytest.raises(SourceError, match="export 'nope' not present"):
        load_changed_blocks("qemu-bitmap:b0", CAP, nbd_export.replace("/vda", "/nope"))


@pytest.mark.parametrize(
    ("uri", "match"),
    [
        ("nbds://host/x", "no TLS"),
        ("nbd+unix:///x", "needs \\?socket=PATH"),
        ("nbd:///x", "has no host"),
    ],
)
def test_unsupported_nbd_uris(uri: str, match: str) -> None:
    with pytest.raises(SourceError, match=match):
        load_changed_blocks("qemu-bitmap:b0", CAP, uri)


def test_json_file_named_like_a_bitmap_spec(tmp_path: Path) -> None:
    path = write(tmp_path, {"block_size": 512, "extents": [[0, 512]]}, "qemu-bitmap:x")
    old = os.getcwd()
    os.chdir(tmp_path)
    try:
        assert load_changed_blocks("./qemu-bitmap:x", CAP, None).extents == [(0, 512)]
    finally:
        os.chdir(old)
    assert path.endswith("qemu-bitmap:x")
