"""Tests of tools/corpus.py on a tiny corpus (256 MiB disks, 24 MiB of data, 2 days, 2 VMs).

They need root and working loop devices (the generator mounts ext4 through an offset loop
device); they are skipped only when that is not available.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from tests.support.helpers import needs_loop

ROOT = Path(__file__).resolve().parents[2]
SEED = 1234
TINY = {"size": 256 << 20, "data_bytes": 24 << 20, "days": 2, "vms": 2}


def _load_corpus() -> ModuleType:
    spec = importlib.util.spec_from_file_location("corpus", ROOT / "tools" / "corpus.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["corpus"] = mod  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(mod)
    return mod


corpus = _load_corpus()


pytestmark = needs_loop


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    out = tmp_path_factory.mktemp("corpus-a")
    manifest = corpus.generate(out, SEED, **TINY)
    return out, manifest


@pytest.fixture(scope="module")
def tiny_again(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("corpus-b")
    corpus.generate(out, SEED, **TINY)
    return out


def _images(out: Path) -> Iterator[Path]:
    yield from sorted(out.glob("vm*/day*.img"))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
    return h.hexdigest()


def _root_partition(manifest: object) -> dict[str, int]:
    parts = manifest.layout["partitions"]  # type: ignore[attr-defined]
    return next(p for p in parts if p["name"] == "root")


def test_manifest_lists_every_day(tiny: tuple[Path, object]) -> None:
    out, _ = tiny
    data = json.loads((out / "manifest.json").read_text())
    assert data["complete"] and data["params"]["seed"] == SEED
    assert [v["name"] for v in data["vms"]] == ["vm1", "vm2"]
    assert data["vms"][1]["clone_of"] == "vm1/day0.img"
    for vm in data["vms"]:
        assert [d["day"] for d in vm["days"]] == [0, 1, 2]
        for d in vm["days"]:
            img = out / d["image"]
            assert img.stat().st_size == TINY["size"]
            assert d["allocated_bytes"] == corpus.allocated_bytes(img)
            # sparse: most of the virtual disk is never written
            assert img.stat().st_blocks * 512 < TINY["size"] // 2
            if d["day"] == 0:
                assert d["cbt"] is None
            else:
                assert d["changed_bytes"] > 0


def test_images_have_valid_gpt(tiny: tuple[Path, object]) -> None:
    out, m = tiny
    root = _root_partition(m)
    for img in _images(out):
        pt = json.loads(subprocess.run(["sfdisk", "-J", str(img)], capture_output=True,
                                       text=True, check=True).stdout)["partitiontable"]
        assert pt["label"] == "gpt"
        assert len(pt["partitions"]) == 2
        p2 = pt["partitions"][1]
        assert p2["start"] * 512 == root["offset"]
        assert p2["size"] * 512 == root["size"]
        assert p2["type"] == corpus.GPT_LINUX_FS


def test_ext4_passes_fsck(tiny: tuple[Path, object]) -> None:
    out, m = tiny
    root = _root_partition(m)
    for img in _images(out):
        loop = subprocess.run(
            ["losetup", "--find", "--show", "--read-only", "--offset", str(root["offset"]),
             "--sizelimit", str(root["size"]), str(img)],
            capture_output=True, text=True, check=True).stdout.strip()
        try:
            proc = subprocess.run(["e2fsck", "-fn", loop], capture_output=True, text=True,
                                  check=False)
        finally:
            subprocess.run(["losetup", "--detach", loop], check=True)
        assert proc.returncode == 0, f"{img}: {proc.stdout}{proc.stderr}"


def _differing_blocks(a: Path, b: Path, block: int = 65536) -> set[int]:
    """Brute force: every block of the virtual disk, no allocation map involved."""
    diff = set()
    with open(a, "rb") as fa, open(b, "rb") as fb:
        off = 0
        while True:
            x, y = fa.read(block), fb.read(block)
            if not x and not y:
                return diff
            if x != y:
                diff.add(off)
            off += block


def test_cbt_matches_image_differences(tiny: tuple[Path, object]) -> None:
    out, m = tiny
    for vm in m.vms:  # type: ignore[attr-defined]
        for prev, cur in zip(vm.days, vm.days[1:], strict=False):
            cbt = json.loads((out / cur.cbt).read_text())
            assert cbt["block_size"] == 65536
            covered = set()
            last_end = -1
            for off, length in cbt["extents"]:
                assert off % 65536 == 0 and length % 65536 == 0 and length > 0
                assert off > last_end, "extents must be sorted, disjoint and merged"
                last_end = off + length
                covered.update(range(off, off + length, 65536))
            assert covered == _differing_blocks(out / prev.image, out / cur.image)
            assert cur.changed_bytes == 65536 * len(covered)


def test_same_seed_gives_identical_images(tiny: tuple[Path, object], tiny_again: Path) -> None:
    out, _ = tiny
    names = [p.relative_to(out) for p in _images(out)]
    assert names == [p.relative_to(tiny_again) for p in _images(tiny_again)]
    for name in names:
        assert _sha256(out / name) == _sha256(tiny_again / name), name
    assert (out / "manifest.json").read_text() == (tiny_again / "manifest.json").read_text()


def test_allocation_map_is_reproducible(tiny: tuple[Path, object]) -> None:
    """No unwritten extents: SEEK_DATA would report them depending on the page cache."""
    out, _ = tiny
    for img in _images(out):
        proc = subprocess.run(["filefrag", "-v", str(img)], capture_output=True, text=True,
                              check=True)
        assert "unwritten" not in proc.stdout, img


def test_clone_shares_most_blocks_with_template(tiny: tuple[Path, object]) -> None:
    out, _ = tiny
    a, b = out / "vm1" / "day0.img", out / "vm2" / "day0.img"
    fd = os.open(a, os.O_RDONLY)
    try:
        segs = list(corpus.data_segments(fd, TINY["size"]))
    finally:
        os.close(fd)
    same = total = 0
    with open(a, "rb") as fa, open(b, "rb") as fb:
        for off, length in segs:
            for pos in range(off - off % 65536, off + length, 65536):
                fa.seek(pos)
                fb.seek(pos)
                total += 1
                same += fa.read(65536) == fb.read(65536)
    assert same / total > 0.7, f"only {same}/{total} template blocks unchanged in the clone"
    assert _sha256(a) != _sha256(b), "the clone has its own application data"


def test_second_run_uses_cache(tiny: tuple[Path, object]) -> None:
    out, m = tiny
    before = {p: p.stat().st_mtime_ns for p in _images(out)}
    again = corpus.generate(out, SEED, **TINY)
    assert again == m
    assert {p: p.stat().st_mtime_ns for p in _images(out)} == before


def test_parse_size() -> None:
    assert corpus.parse_size("8G") == 8 << 30
    assert corpus.parse_size("256M") == 256 << 20
    assert corpus.parse_size("1.5GiB") == 3 << 29
    assert corpus.parse_size("4096") == 4096
