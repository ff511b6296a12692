"""Changed-block tracking end to end: incrementals read only what changed, yet are full images."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from ingest.cbt.jsonfile import MAX_LIST_BYTES
from repofs.store.config import DEFAULT_CHUNK
from repofs.store.records import RECORD_HEADER_SIZE, RecordType
from repofs.store.repository import Repository
from repofs.store.restorepoint import DiskInfo
from tests.support.helpers import (
    assert_one_line_error,
    disk_doc,
    ingest,
    make_image,
    mounted,
    not_a_small_regular_file,
    qemu_compare,
    repofs,
)
from tests.support.maint import flip_byte, read_disk

KiB, MiB = 1 << 10, 1 << 20
CHUNK = DEFAULT_CHUNK  # repositories here are made by a plain 'repofs init'


def write_list(path: Path, extents: list[tuple[int, int]], block: int = 512) -> Path:
    """A repofs JSON list, with each extent rounded out to ``block`` as a hypervisor reports it."""
    out = []
    for off, length in extents:
        a = off // block * block
        b = -(-(off + length) // block) * block
        out.append([a, b - a])
    path.write_text(json.dumps({"block_size": block, "extents": out}))
    return path


def poke(img: Path, offset: int, data: bytes) -> tuple[int, int]:
    with open(img, "r+b") as f:
        f.seek(offset)
        f.write(data)
    return offset, len(data)


def listing(repo: Path, vm: str) -> list[dict]:
    return json.loads(repofs("list", repo, vm, "--json").stdout)


class TestChain:
    def test_every_restore_point_of_a_chain_reads_back(self, tmp_path: Path, repo: Path) -> None:
        """Six restore points: chunk-aligned, boundary-crossing, last partial chunk, zeroed region,
        scattered writes; each reads back identical to the disk of its moment, and each
        incremental reads only the changed chunks."""
        size = 8 * MiB + 3 * 512
        img = make_image(
            tmp_path / "d.img", size, [(0, os.urandom(3 * MiB)), (6 * MiB, os.urandom(MiB))]
        )
        days = [tmp_path / "day0.img"]
        shutil.copy(img, days[0])
        ids = [ingest(repo, "vm", f"d={img}")]
        changes = [  # applied one day at a time
            lambda: [poke(img, 10 * CHUNK, os.urandom(CHUNK))],
            lambda: [poke(img, 20 * CHUNK - 100, os.urandom(200))],
            lambda: [poke(img, size - 1000, os.urandom(900))],
            lambda: [poke(img, MiB, bytes(256 * KiB))],
            lambda: [poke(img, o, os.urandom(3000)) for o in (5, 2 * MiB + 7, 7 * MiB + 12345)],
        ]
        for n, change in enumerate(changes, start=1):
            extents = change()
            cbt = write_list(tmp_path / f"cbt{n}.json", extents)
            ids.append(ingest(repo, "vm", f"d={img}", extra=("--changed-blocks", f"d={cbt}")))
            days.append(tmp_path / f"day{n}.img")
            shutil.copy(img, days[-1])
            rp = listing(repo, "vm")[-1]
            assert rp["kind"] == "cbt" and rp["parent"] == ids[-2]
            touched = sum(len(range((o // CHUNK), -(-(o + ln) // CHUNK))) for o, ln in extents)
            assert rp["disks"][0]["bytes_read"] <= touched * CHUNK
        table = repofs("list", repo, "vm").stdout
        assert table.count("cbt") == 5  # the lineage is shown
        with mounted(repo, tmp_path / "mnt") as mnt:
            for rp_id, day in zip(ids, days, strict=True):
                qemu_compare(day, mnt / "vm" / rp_id / "d.vmdk")

    def test_cbt_and_full_read_paths_report_their_cost(self, tmp_path: Path, repo: Path) -> None:
        """Without a list an incremental reads everything and stores only what dedup misses."""
        img = make_image(tmp_path / "d.img", 4 * MiB, [(0, os.urandom(4 * MiB))])
        ingest(repo, "vm", f"d={img}")
        ext = poke(img, MiB, os.urandom(CHUNK))
        ingest(repo, "vm", f"d={img}")
        cbt = write_list(tmp_path / "c.json", [poke(img, 2 * MiB, os.urandom(CHUNK)), ext])
        ingest(repo, "vm", f"d={img}", extra=("--changed-blocks", f"d={cbt}"))
        full, dedup, cbt_rp = (p["disks"][0] for p in listing(repo, "vm"))
        assert dedup["read_mode"] == "dedup" and dedup["bytes_read"] == 4 * MiB
        assert CHUNK // 2 < dedup["bytes_new"] <= CHUNK + 512
        assert cbt_rp["read_mode"] == "cbt" and cbt_rp["bytes_read"] == 2 * CHUNK
        assert cbt_rp["allocated"] == full["allocated"] == 4 * MiB


class TestShapeChanges:
    def test_grown_shrunk_new_and_removed_disks(self, tmp_path: Path, repo: Path) -> None:
        """Growth is read even when the list misses it; a shrink, a new disk and a vanished
        disk are each handled, and every restore point reads back."""
        a = make_image(tmp_path / "a.img", 2 * MiB + 512, [(0, os.urandom(2 * MiB + 512))])
        b = make_image(tmp_path / "b.img", MiB, [(0, os.urandom(MiB))])
        snaps: list[tuple[str, dict[str, Path]]] = []

        def snap(tag: str, rp: str, disks: dict[str, Path]) -> None:
            copies = {}
            for name, src in disks.items():
                copies[name] = tmp_path / f"{tag}-{name}.img"
                shutil.copy(src, copies[name])
            snaps.append((rp, copies))

        snap("0", ingest(repo, "vm", f"a={a}"), {"a": a})
        with open(a, "r+b") as f:  # grow; the list only names an old change
            f.truncate(5 * MiB)
            f.seek(4 * MiB)
            f.write(os.urandom(MiB))
        cbt = write_list(tmp_path / "g.json", [poke(a, 0, b"grown")])
        snap(
            "1",
            ingest(repo, "vm", f"a={a}", f"b={b}", extra=("--changed-blocks", f"a={cbt}")),
            {"a": a, "b": b},
        )
        with open(a, "r+b") as f:  # shrink to a partial last chunk
            f.truncate(3 * MiB + 1024)
        cbt = write_list(tmp_path / "s.json", [poke(a, 100, b"shrunk")])
        snap("2", ingest(repo, "vm", f"a={a}", extra=("--changed-blocks", f"a={cbt}")), {"a": a})
        with mounted(repo, tmp_path / "mnt") as mnt:
            for rp, copies in snaps:
                assert sorted(os.listdir(mnt / "vm" / rp)) == sorted(
                    f for n in copies for f in (f"{n}.vmdk", f"{n}-flat.vmdk")
                )
                for name, copy in copies.items():
                    qemu_compare(copy, mnt / "vm" / rp / f"{name}.vmdk")


class TestVmwareList:
    def test_paged_query_changed_disk_areas(self, tmp_path: Path, repo: Path) -> None:
        """Several QueryChangedDiskAreas results appended, as VADP callers page a disk."""
        size = 4 * MiB
        img = make_image(tmp_path / "d.img", size, [(0, os.urandom(size))])
        ingest(repo, "vm", f"d={img}")
        poke(img, 3 * MiB + 5, b"changed")
        pages = [
            {"startOffset": 0, "length": 2 * MiB, "changedArea": []},
            {
                "startOffset": 2 * MiB,
                "length": 2 * MiB,
                "changedArea": [{"start": 3 * MiB, "length": CHUNK}],
            },
        ]
        cbt = tmp_path / "vmware.json"
        cbt.write_text(json.dumps(pages))
        rp = ingest(repo, "vm", f"d={img}", extra=("--changed-blocks", f"d={cbt}"))
        assert listing(repo, "vm")[-1]["disks"][0]["bytes_read"] == CHUNK
        with mounted(repo, tmp_path / "mnt") as mnt:
            qemu_compare(img, mnt / "vm" / rp / "d.vmdk")


class TestCbtCheck:
    def test_a_lying_list_is_caught(self, tmp_path: Path, repo: Path) -> None:
        """A change the list does not mention fails the ingest, naming disk and offsets, one
        range for neighbouring chunks."""
        img = make_image(tmp_path / "d.img", 2 * MiB, [(0, os.urandom(2 * MiB))])
        ingest(repo, "vm", f"d={img}")
        for chunk in (5, 6, 7):
            poke(img, chunk * CHUNK + 10, b"unlisted")
        cbt = write_list(tmp_path / "c.json", [poke(img, 0, b"listed")])
        p = cbt_ingest(repo, img, cbt, "--cbt-check", "100", check=False)
        assert_one_line_error(p, "--cbt-check failed", "disk d", f"bytes {5 * CHUNK}-{8 * CHUNK} ")
        assert len(listing(repo, "vm")) == 1

    def test_a_grown_disk_is_sampled_only_where_inherited(self, tmp_path: Path, repo: Path) -> None:
        """With a sample larger than the disk every inherited chunk is compared, and the
        grown area, read whatever the list says, is not: a true list passes, a lie is named."""
        img = make_image(tmp_path / "d.img", MiB, [(0, os.urandom(MiB))])
        ingest(repo, "vm", f"d={img}")
        with open(img, "r+b") as f:
            f.truncate(2 * MiB)
            f.seek(MiB)
            f.write(os.urandom(MiB))
        cbt = write_list(tmp_path / "c.json", [poke(img, 0, b"listed")])
        rp = ingest(
            repo, "vm", f"d={img}", extra=("--changed-blocks", f"d={cbt}", "--cbt-check", "99")
        )
        poke(img, 3 * CHUNK, b"unlisted")
        p = cbt_ingest(repo, img, cbt, "--cbt-check", "99", check=False)
        assert_one_line_error(p, "--cbt-check failed", f"bytes {3 * CHUNK}-{4 * CHUNK} differ")
        assert listing(repo, "vm")[-1]["id"] == rp

    def test_cbt_check_without_a_list_is_refused(self, tmp_path: Path, repo: Path) -> None:
        """It checked nothing, silently: a scheduled job would have taken that for a pass."""
        img = make_image(tmp_path / "d.img", MiB, [(0, os.urandom(MiB))])
        ingest(repo, "vm", f"d={img}")
        p = repofs("ingest", repo, "--vm", "vm", f"d={img}", "--cbt-check", "5", check=False)
        assert_one_line_error(p, "--cbt-check checks changed-block lists")
        assert len(listing(repo, "vm")) == 1


class TestBadLists:
    @pytest.fixture
    def base(self, tmp_path: Path, repo: Path) -> Path:
        img = make_image(tmp_path / "d.img", MiB, [(0, os.urandom(MiB))])
        ingest(repo, "vm", f"d={img}")
        return img

    @pytest.mark.parametrize(
        "doc,needle",
        [
            ({"block_size": 512, "extents": [[0, 2 * MiB]]}, "beyond the end"),
            ({"block_size": 512, "extents": [[512, 0]]}, "length"),
            ({"block_size": 512, "extents": [[-512, 512]]}, "negative"),
            ({"block_size": 1000, "extents": [[0, 1000]]}, "power of two"),
            ({"nonsense": 1}, "c.json"),
        ],
    )
    def test_bad_list_writes_nothing(
        self, tmp_path: Path, repo: Path, base: Path, doc: dict, needle: str
    ) -> None:
        """Each malformed list is a one-line error and no restore point."""
        cbt = tmp_path / "c.json"
        cbt.write_text(json.dumps(doc))
        p = cbt_ingest(repo, base, cbt, check=False)
        assert_one_line_error(p, needle)
        assert len(listing(repo, "vm")) == 1

    @pytest.mark.parametrize("kind", ["fifo", "dev-zero", "directory", "too-large"])
    def test_list_that_is_not_a_small_regular_file(
        self, tmp_path: Path, repo: Path, base: Path, kind: str
    ) -> None:
        """A FIFO or /dev/zero is refused at once, not waited on or read until memory runs out."""
        cbt, needle = not_a_small_regular_file(tmp_path / "c.json", kind, MAX_LIST_BYTES)
        p = cbt_ingest(repo, base, cbt, check=False, timeout=60)
        assert_one_line_error(p, str(cbt), "changed-block list", needle)
        assert p.returncode == 4
        assert len(listing(repo, "vm")) == 1

    def test_overlapping_unsorted_extents_are_merged(
        self, tmp_path: Path, repo: Path, base: Path
    ) -> None:
        """Unsorted and overlapping extents are legal."""
        poke(base, 4096, b"x")
        cbt = tmp_path / "c.json"
        cbt.write_text(
            json.dumps({"block_size": 4096, "extents": [[8192, 4096], [0, 8192], [4096, 4096]]})
        )
        rp = ingest(repo, "vm", f"d={base}", extra=("--changed-blocks", f"d={cbt}"))
        with mounted(repo, tmp_path / "mnt") as mnt:
            qemu_compare(base, mnt / "vm" / rp / "d.vmdk")

    def test_list_for_unknown_disk_and_bad_parents(
        self, tmp_path: Path, repo: Path, base: Path
    ) -> None:
        """A list for a disk not ingested, a missing parent, a parent of another VM, no parent."""
        cbt = write_list(tmp_path / "c.json", [(0, 512)])
        assert_one_line_error(
            cbt_ingest(repo, base, cbt, check=False, listed="e"),
            "not in this ingest",
        )
        ingest(repo, "other", f"d={base}")
        other = ingest(repo, "other", f"d={base}")  # later than vm's only id, so not one of vm's
        assert_one_line_error(
            cbt_ingest(repo, base, cbt, "--parent", other, check=False),
            "no restore point",
        )
        assert_one_line_error(
            cbt_ingest(repo, base, cbt, check=False, vm="new"),
            "parent",
        )
        assert len(listing(repo, "vm")) == 1

    def test_missing_qemu_bitmap(self, tmp_path: Path, repo: Path) -> None:
        """A bitmap name that does not exist lists the ones that do."""
        q = tmp_path / "d.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(q), "4M"], check=True)
        subprocess.run(["qemu-img", "bitmap", "--add", str(q), "b0"], check=True)
        ingest(repo, "q", f"d={q}")
        p = cbt_ingest(repo, q, "qemu-bitmap:nope", check=False, vm="q")
        assert_one_line_error(p, "nope", "b0")


class TestQemuBitmap:
    def test_dirty_bitmap_incremental(self, tmp_path: Path, repo: Path) -> None:
        """A qcow2 persistent dirty bitmap drives an incremental that reads only its extents."""
        q = tmp_path / "d.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(q), "16M"], check=True)
        subprocess.run(
            ["qemu-io", "-f", "qcow2", "-c", "write -P 0x33 0 4M", str(q)],
            check=True,
            capture_output=True,
        )
        ingest(repo, "q", f"d={q}")
        subprocess.run(["qemu-img", "bitmap", "--add", str(q), "since-full"], check=True)
        subprocess.run(
            [
                "qemu-io",
                "-f",
                "qcow2",
                "-c",
                "write -P 0x44 1M 64k",
                "-c",
                "write -z 2M 128k",
                "-c",
                "write -P 0x55 10M 4k",
                str(q),
            ],
            check=True,
            capture_output=True,
        )
        rp = ingest(repo, "q", f"d={q}", extra=("--changed-blocks", "d=qemu-bitmap:since-full"))
        disk = listing(repo, "q")[-1]["disks"][0]
        assert disk["read_mode"] == "cbt" and disk["bytes_read"] <= 2 * CHUNK  # at 1M, at 10M
        with mounted(repo, tmp_path / "mnt") as mnt:
            proc = subprocess.run(
                ["qemu-img", "compare", str(q), str(mnt / "q" / rp / "d.vmdk")],
                capture_output=True,
                text=True,
            )
            assert proc.returncode == 0, proc.stdout + proc.stderr


def damage_record(repo: Path, rtype: RecordType, digest: bytes) -> None:
    """Flip a byte in an object's pack record, then rebuild-index, which rightly drops it."""
    with Repository.open(str(repo)) as r:
        loc = r.index.locate(rtype, digest)
        assert loc is not None
        pack = r.packs.path_of(loc.pack_id)
    flip_byte(pack, loc.offset + RECORD_HEADER_SIZE + 3)
    out = repofs("rebuild-index", repo, check=False).stdout
    assert "record dropped" in out
    with Repository.open(str(repo)) as r:
        assert r.index.locate(rtype, digest) is None


def known_whole(repo: Path, vm: str, rp_id: str) -> bool:
    with Repository.open(str(repo)) as r:
        return r.known_whole(r.resolve(vm, rp_id))


def disk_map(repo: Path, vm: str, rp_id: str) -> tuple[Repository, DiskInfo]:
    r = Repository.open(str(repo))
    info = r.resolve(vm, rp_id).disk("d")
    assert info is not None
    return r, info


class TestInheritedDamage:
    def test_a_lost_chunk_is_read_from_the_source(self, tmp_path: Path, repo: Path) -> None:
        """A chunk rebuild-index dropped is not inherited: the incremental reads it again, says
        so, and heals the chain; verify passes and every restore point reads back."""
        data = os.urandom(4 * MiB)
        img = make_image(tmp_path / "d.img", 4 * MiB, [(0, data)])
        full = ingest(repo, "vm", f"d={img}")
        assert known_whole(repo, "vm", full)
        r, info = disk_map(repo, "vm", full)
        with r:
            lost = r.map_reader(info).ref_at(MiB // CHUNK)
        damage_record(repo, RecordType.CHUNK, lost)
        assert repofs("verify", repo, check=False).returncode == 5
        assert not known_whole(repo, "vm", full)  # the rebuilt index checks it once
        cbt = write_list(tmp_path / "c1.json", [poke(img, 0, b"changed")])
        p = repofs("ingest", repo, "--vm", "vm", f"d={img}", "--changed-blocks", f"d={cbt}")
        assert f"disk d: 0.1 MiB the parent {full} lacked were read from the source" in p.stderr
        first = p.stdout.split()[-1]
        assert listing(repo, "vm")[-1]["disks"][0]["bytes_read"] == 2 * CHUNK
        assert known_whole(repo, "vm", first)
        assert repofs("verify", repo, check=False).returncode == 0
        day1 = tmp_path / "day1.img"
        shutil.copy(img, day1)
        cbt = write_list(tmp_path / "c2.json", [poke(img, 3 * MiB, b"again")])
        p = repofs("ingest", repo, "--vm", "vm", f"d={img}", "--changed-blocks", f"d={cbt}")
        assert "lacked" not in p.stderr
        second = p.stdout.split()[-1]
        assert listing(repo, "vm")[-1]["disks"][0]["bytes_read"] == CHUNK
        assert repofs("verify", repo).returncode == 0
        assert read_disk(repo, "vm", first, "d") == day1.read_bytes()
        assert read_disk(repo, "vm", full, "d") == data
        with mounted(repo, tmp_path / "mnt") as mnt:
            qemu_compare(day1, mnt / "vm" / first / "d.vmdk")
            qemu_compare(img, mnt / "vm" / second / "d.vmdk")

    def test_a_lost_map_page_is_read_whole(self, tmp_path: Path, repo: Path) -> None:
        """A parent whose level-0 page is gone has its whole range read again, only the
        allocated part of it, and the new restore point counts its allocation right."""
        size = 2 * 1024 * CHUNK  # two level-0 pages under a root
        img = make_image(
            tmp_path / "d.img",
            size,
            [(0, os.urandom(MiB)), (1024 * CHUNK + 5 * MiB, os.urandom(MiB + 512))],
        )
        full = ingest(repo, "vm", f"d={img}")
        r, info = disk_map(repo, "vm", full)
        with r:
            page = r.map_reader(info).subtree_ref(0, 1)
        damage_record(repo, RecordType.PAGE, page)
        cbt = write_list(tmp_path / "c.json", [poke(img, 0, b"changed")])
        p = repofs("ingest", repo, "--vm", "vm", f"d={img}", "--changed-blocks", f"d={cbt}")
        assert f"disk d: 1.1 MiB the parent {full} lacked were read from the source" in p.stderr
        rp = p.stdout.split()[-1]
        disk = listing(repo, "vm")[-1]["disks"][0]
        assert disk["bytes_read"] == CHUNK + MiB + CHUNK  # the change, the 1.1 MiB as chunks
        assert disk["allocated"] == MiB + MiB + CHUNK
        assert repofs("verify", repo).returncode == 0
        assert read_disk(repo, "vm", rp, "d") == img.read_bytes()


def positions(repo: Path, vm: str) -> list[str | None]:
    return [rp["disks"][0]["cbt_position"] for rp in listing(repo, vm)]


def cbt_ingest(
    repo: Path,
    img: Path,
    cbt: Path | str,
    *extra: str | Path,
    check: bool = True,
    vm: str = "vm",
    listed: str = "d",
    timeout: float = 600,
) -> subprocess.CompletedProcess[str]:
    """Ingest ``img`` as d of ``vm`` with the changed-block list ``cbt`` of disk ``listed``."""
    return repofs(
        "ingest",
        repo,
        "--vm",
        vm,
        f"d={img}",
        "--changed-blocks",
        f"{listed}={cbt}",
        *extra,
        check=check,
        timeout=timeout,
    )


class TestCbtPosition:
    @pytest.fixture
    def base(self, tmp_path: Path, repo: Path) -> Path:
        """A VM whose full backup was taken at changed-block position ``52 de/1``."""
        img = make_image(tmp_path / "d.img", MiB, [(0, os.urandom(MiB))])
        ingest(repo, "vm", f"d={img}", extra=("--cbt-position", "d=52 de/1"))
        return img

    def test_matching_bases_are_accepted_and_positions_shown(
        self, tmp_path: Path, repo: Path, base: Path
    ) -> None:
        """A base given on the command line or in the JSON list that is the parent's position
        is taken; every restore point shows the position it was taken at."""
        cbt = write_list(tmp_path / "c1.json", [poke(base, 0, b"one")])
        p = cbt_ingest(repo, base, cbt, "--cbt-base", "d=52 de/1", "--cbt-position", "d=52 de/2")
        assert "warning" not in p.stderr
        poke(base, 512, b"two")
        doc = {"block_size": 512, "base": "52 de/2", "extents": [[512, 512]]}
        (tmp_path / "c2.json").write_text(json.dumps(doc))
        rp = cbt_ingest(repo, base, tmp_path / "c2.json", "--cbt-position", "d=52 de/3")
        assert positions(repo, "vm") == ["52 de/1", "52 de/2", "52 de/3"]
        with mounted(repo, tmp_path / "mnt") as mnt:
            qemu_compare(base, mnt / "vm" / rp.stdout.split()[-1] / "d.vmdk")

    def test_skipped_and_repeated_jobs_are_refused(
        self, tmp_path: Path, repo: Path, base: Path
    ) -> None:
        """A list that starts after the parent (a job skipped) or before it (a job repeated)
        is refused naming both positions, and writes nothing."""
        cbt = write_list(tmp_path / "c.json", [poke(base, 0, b"x")])
        p = cbt_ingest(repo, base, cbt, "--cbt-base", "d=52 de/2", check=False)
        assert_one_line_error(p, "disk d", "'52 de/2'", "'52 de/1'", "skipped or repeated")
        assert p.returncode == 4
        assert positions(repo, "vm") == ["52 de/1"]
        cbt_ingest(repo, base, cbt, "--cbt-base", "d=52 de/1", "--cbt-position", "d=52 de/2")
        p = cbt_ingest(repo, base, cbt, "--cbt-base", "d=52 de/1", check=False)
        assert_one_line_error(p, "'52 de/1'", "'52 de/2'", "skipped or repeated")
        assert positions(repo, "vm") == ["52 de/1", "52 de/2"]

    def test_a_base_needs_a_recorded_position(self, tmp_path: Path, repo: Path) -> None:
        """A list with a base against a parent that recorded none is refused: nothing says
        where the parent was taken."""
        img = make_image(tmp_path / "d.img", MiB, [(0, os.urandom(MiB))])
        ingest(repo, "vm", f"d={img}")
        cbt = write_list(tmp_path / "c.json", [poke(img, 0, b"x")])
        p = cbt_ingest(repo, img, cbt, "--cbt-base", "d=52 de/1", check=False)
        assert_one_line_error(p, "'52 de/1'", "recorded no changed-block position")
        assert len(listing(repo, "vm")) == 1

    def test_a_list_without_base_is_taken_with_a_warning(
        self, tmp_path: Path, repo: Path, base: Path
    ) -> None:
        """Scripts that give no base go on working, warned that nothing was checked."""
        cbt = write_list(tmp_path / "c.json", [poke(base, 0, b"x")])
        p = cbt_ingest(repo, base, cbt)
        assert "repofs: warning: disk d: the changed-block list names no base" in p.stderr
        assert "'52 de/1'" in p.stderr
        assert positions(repo, "vm") == ["52 de/1", None]

    @pytest.mark.parametrize(
        "args,needle",
        [
            (("--cbt-position", "d=a\tb"), "control character"),
            (("--cbt-position", "d= a"), "whitespace"),
            (("--cbt-position", "d=" + "x" * 257), "longer than 256"),
            (("--cbt-position", "e=1"), "not in this ingest"),
            (("--cbt-position", "d=1", "--cbt-position", "d=2"), "twice"),
            (("--cbt-base", "d=52 de/1"), "needs its --changed-blocks"),
        ],
    )
    def test_bad_positions_are_usage_errors(
        self, tmp_path: Path, repo: Path, base: Path, args: tuple[str, ...], needle: str
    ) -> None:
        """Each is a one-line error with exit status 2 and no restore point."""
        p = repofs("ingest", repo, "--vm", "vm", f"d={base}", *args, check=False)
        assert_one_line_error(p, needle)
        assert p.returncode == 2
        assert len(listing(repo, "vm")) == 1

    def test_json_base_must_agree_and_be_a_string(
        self, tmp_path: Path, repo: Path, base: Path
    ) -> None:
        """A JSON base that is not a position, or that --cbt-base contradicts, is refused."""
        cbt = tmp_path / "c.json"
        cbt.write_text(json.dumps({"block_size": 512, "base": 7, "extents": []}))
        assert_one_line_error(cbt_ingest(repo, base, cbt, check=False), "base 7", "string")
        cbt.write_text(json.dumps({"block_size": 512, "base": "52 de/1", "extents": []}))
        p = cbt_ingest(repo, base, cbt, "--cbt-base", "d=52 de/0", check=False)
        assert_one_line_error(p, "--cbt-base", "'52 de/0'", "'52 de/1'")
        assert len(listing(repo, "vm")) == 1

    def test_rebuild_index_brings_positions_back(
        self, tmp_path: Path, repo: Path, base: Path
    ) -> None:
        """Positions live in each restore point's immutable record, not only in the index."""
        cbt = write_list(tmp_path / "c.json", [poke(base, 0, b"x")])
        cbt_ingest(repo, base, cbt, "--cbt-base", "d=52 de/1", "--cbt-position", "d=52 de/2")
        shutil.rmtree(repo / "index")
        repofs("rebuild-index", repo)
        assert positions(repo, "vm") == ["52 de/1", "52 de/2"]
        assert repofs("verify", repo).returncode == 0

    def test_qemu_bitmap_is_its_own_base(self, tmp_path: Path, repo: Path) -> None:
        """A qemu bitmap holds the changes since the checkpoint of its name: that name is the
        list's base, checked when the parent recorded a position."""
        q = tmp_path / "d.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(q), "4M"], check=True)
        ingest(repo, "vm", f"d={q}", extra=("--cbt-position", "d=c1"))
        for name in ("c1", "c2"):
            subprocess.run(["qemu-img", "bitmap", "--add", str(q), name], check=True)
        subprocess.run(
            ["qemu-io", "-f", "qcow2", "-c", "write -P 0x44 1M 64k", str(q)],
            check=True,
            capture_output=True,
        )
        p = cbt_ingest(repo, q, "qemu-bitmap:c2", check=False)
        assert_one_line_error(p, "'c2'", "'c1'", "skipped or repeated")
        p = cbt_ingest(repo, q, "qemu-bitmap:c1", "--cbt-position", "d=c2")
        assert "warning" not in p.stderr
        assert positions(repo, "vm") == ["c1", "c2"]


class TestRecordCompatibility:
    def test_a_record_without_position_keeps_its_bytes(self) -> None:
        """A disk without a position writes no cbt_position key, so records written before the
        field existed read back and serialise to the same document."""
        from repofs.store.restorepoint import RestorePoint

        disk = disk_doc("d", 512)
        doc = {"vm": "v", "id": "i", "seq": 1, "vm_seq": 1, "created": 0.0, "chunk_size": 512}
        old = RestorePoint.from_doc({**doc, "disks": [disk]}).to_doc()
        assert "cbt_position" not in old["disks"][0]
        new = RestorePoint.from_doc({**doc, "disks": [{**disk, "cbt_position": "p"}]})
        assert new.to_doc()["disks"][0]["cbt_position"] == "p"
