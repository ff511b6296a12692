"""verify: every chunk re-hashed, every map resolved, every problem mapped to the bytes it harms."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import lmdb
import pytest

import repofs.maintenance.verify.checks as verify_module
from repofs.maintenance.verify.checks import verify_repository
from repofs.maintenance.verify.packreader import PackReader, _read_from_store
from repofs.maintenance.verify.windows import _Entry, plan_windows
from repofs.store.records import RECORD_HEADER_SIZE, RecordType
from repofs.store.repository import Repository
from repofs.store.schema import encode_location, location_fields, object_key
from tests.support.helpers import assert_one_line_error, make_image, repofs, skip_unless_o_direct
from tests.support.maint import (
    MiB,
    chunk_record,
    flip_byte,
    ingest_here,
    new_repo,
    noise,
    pack_files,
    rp_ids,
)

CS = 64 * 1024
Fixture = tuple[Path, Path, list[str]]


@pytest.fixture
def two_rps(tmp_path: Path) -> tuple[Path, Path, list[str]]:
    """VM web with two restore points of an 8 MiB disk that differ in [1 MiB, 2 MiB)."""
    repo = new_repo(tmp_path / "repo")
    img = make_image(tmp_path / "web.img", 8 * MiB, [(0, noise(4 * MiB, 1))])
    first = ingest_here(repo, "web", {"d0": img}, now=1_700_000_000)
    with open(img, "r+b") as f:
        f.seek(MiB)
        f.write(noise(MiB, 2))
    second = ingest_here(repo, "web", {"d0": img}, now=1_700_003_600)
    return repo, img, [first, second]


@pytest.fixture
def pack_readers(monkeypatch: pytest.MonkeyPatch) -> list[PackReader]:
    """Every PackReader that verify makes in this test, to see what it read and how."""
    made: list[PackReader] = []

    class Recording(PackReader):
        def __init__(self, *args: Any) -> None:
            super().__init__(*args)
            made.append(self)

    monkeypatch.setattr(verify_module, "PackReader", Recording)
    return made


def damage_named(message: str) -> bool:
    """A damaged payload, in the words of an unencrypted record or of a sealed one."""
    return "does not match its digest" in message or "does not authenticate" in message


class TestCleanRepository:
    def test_passes_and_counts(self, two_rps: Fixture) -> None:
        """A healthy repository verifies with exit 0 and a summary of what was read."""
        repo, _img, _ids = two_rps
        proc = repofs("verify", repo)
        assert "no problems found" in proc.stdout
        assert re.search(r"checked 2 restore point\(s\) of 1 VM\(s\)", proc.stdout), proc.stdout

    def test_each_shared_page_is_read_once(self, tmp_path: Path) -> None:
        """Ten restore points sharing most pages cost the distinct pages, not 10 walks."""
        repo = new_repo(tmp_path / "repo", chunk_size=4096)
        writes = [(i * MiB, noise(8192, i)) for i in range(24)]
        img = make_image(tmp_path / "a.img", 24 * MiB, writes)
        for k in range(10):
            with open(img, "r+b") as f:
                f.seek(k * 3 * MiB + 4096 * 7)
                f.write(noise(4096, 100 + k))
            ingest_here(repo, "vm", {"d0": img}, now=1_700_000_000 + k)
        with Repository.open(str(repo)) as r:
            pages = r.stats()["page_count"]
        result = verify_repository(str(repo))
        assert result.ok and result.restore_points == 10
        assert result.pages == pages  # every distinct page once, no more

    def test_reads_each_pack_once_in_offset_order(
        self, two_rps: Fixture, pack_readers: list[PackReader]
    ) -> None:
        """Objects are read sorted by pack and offset, in large block-aligned O_DIRECT windows."""
        repo, _img, _ids = two_rps
        skip_unless_o_direct(repo)  # the fast path is the one tested; ramfs has its own test
        assert verify_repository(str(repo), threads=2).ok
        (reader,) = pack_readers
        assert reader.direct_packs == len(pack_files(repo)) and reader.buffered_packs == 0
        reads = [(w.pack_id, w.start, w.length) for w in reader.windows]
        assert any(n > 4 * CS for _p, _o, n in reads), reads
        assert all(offset % 4096 == 0 for _p, offset, _n in reads)
        order = [p for p, _o, _n in reads]
        runs = [p for i, p in enumerate(order) if i == 0 or order[i - 1] != p]
        assert len(runs) == len(set(runs))  # each pack visited in one run
        for p in set(order):
            offsets = [o for q, o, _n in reads if q == p]
            assert offsets == sorted(offsets)

    def test_reader_returns_what_ranged_reads_return(self, tmp_path: Path) -> None:
        """PackReader (O_DIRECT, reused buffers) and a store's ranged reads see the same bytes."""
        skip_unless_o_direct(tmp_path)
        repo = new_repo(tmp_path / "repo")
        img = make_image(tmp_path / "a.img", 20 * MiB, [(0, noise(20 * MiB, 3))])
        ingest_here(repo, "a", {"d0": img})
        with Repository.open(str(repo)) as r:
            entries = sorted(
                _Entry(*location_fields(v), k[0], k[1:])
                for k, v in r.index.read(lambda t: list(r.index.items(t, "objects")))
            )
            windows = plan_windows(entries)
            assert len(windows) >= 3  # 20 MiB of chunks: several windows in one pack
            want = [bytes(data) for _w, data, _n in _read_from_store(r.packs, windows)]
            with PackReader(r.packs, windows, 2) as reader:  # two buffers: reuse is exercised
                got = []
                for _window, buf, n in reader:
                    assert buf is not None, n
                    got.append(buf[: int(n)])
                    reader.release(buf)
            assert reader.direct_packs >= 1
        assert got == want

    def test_progress_bar_on_a_terminal(
        self, two_rps: tuple[Path, Path, list[str]], capsys: pytest.CaptureFixture[str]
    ) -> None:
        """With a terminal (forced here), verify draws a progress line on stderr."""
        repo, _img, _ids = two_rps
        assert verify_repository(str(repo), progress=True).ok
        assert "verify: " in capsys.readouterr().err


class TestDamage:
    def test_flipped_chunk_names_every_restore_point_and_range(
        self, two_rps: tuple[Path, Path, list[str]]
    ) -> None:
        """A corrupt chunk shared by two restore points is reported with both, at its byte range."""
        repo, _img, ids = two_rps
        pack, offset, _stored = chunk_record(repo, "web", ids[0], 2 * MiB + 5)
        flip_byte(pack, offset + RECORD_HEADER_SIZE + 100)
        proc = repofs("verify", repo, check=False)
        assert proc.returncode == 5
        assert_one_line_error(proc, "verify found 1 problem")
        assert "PROBLEM chunk" in proc.stdout and damage_named(proc.stdout)
        for rp in ids:
            want = f"affects web/{rp} d0-flat.vmdk bytes {2 * MiB}-{2 * MiB + CS - 1}"
            assert want in proc.stdout

    def test_damage_at_the_edges_of_read_windows(
        self, tmp_path: Path, pack_readers: list[PackReader]
    ) -> None:
        """Records first and last in a read window, and a damaged header, are each found."""
        repo = new_repo(tmp_path / "repo")
        img = make_image(tmp_path / "a.img", 20 * MiB, [(0, noise(20 * MiB, 4))])
        rp = ingest_here(repo, "a", {"d0": img})
        assert verify_repository(str(repo)).ok
        chunks = [
            e for w in pack_readers[0].windows for e in w.entries if e.rtype == RecordType.CHUNK
        ]
        windows = [w for w in pack_readers[0].windows if len(w.entries) > 1]
        assert len(windows) >= 2
        edges = {windows[0].entries[0], windows[0].entries[-1], windows[1].entries[0]}
        with Repository.open(str(repo)) as r:
            pack_of = {e: Path(r.packs.path_of(e.pack_id)) for e in chunks}
        for e in edges:
            flip_byte(pack_of[e], e.offset + RECORD_HEADER_SIZE + e.stored_len - 1)  # last byte
        header_hit = chunks[len(chunks) // 2]
        assert header_hit not in edges
        flip_byte(pack_of[header_hit], header_hit.offset + 10)  # in the lengths: the CRC fails
        result = verify_repository(str(repo))
        messages = sorted(p.message for p in result.problems)
        assert len(messages) == 4, messages
        assert sum(damage_named(m) for m in messages) == 3
        assert sum("record header checksum mismatch" in m for m in messages) == 1
        for e in [*edges, header_hit]:
            assert any(f"offset {e.offset}:" in m for m in messages), (e.offset, messages)
        affected = {a for p in result.problems for a in p.affects}
        assert all(a.startswith(f"a/{rp} d0-flat.vmdk bytes ") for a in affected), affected

    def test_pack_without_o_direct_is_read_through_the_page_cache(
        self, tmp_path: Path, pack_readers: list[PackReader]
    ) -> None:
        """On a file system that refuses O_DIRECT (ramfs), verify reads and still finds damage."""
        if os.geteuid() != 0:
            pytest.skip("mounting ramfs needs root")
        mnt = tmp_path / "ramfs"
        mnt.mkdir()
        if subprocess.run(["mount", "-t", "ramfs", "ramfs", str(mnt)]).returncode != 0:
            pytest.skip("cannot mount ramfs here")
        try:
            repo = new_repo(mnt / "repo")
            img = make_image(tmp_path / "a.img", 4 * MiB, [(0, noise(4 * MiB, 5))])
            rp = ingest_here(repo, "a", {"d0": img})
            pack, offset, _s = chunk_record(repo, "a", rp, 3 * MiB)
            flip_byte(pack, offset + RECORD_HEADER_SIZE + 7)
            result = verify_repository(str(repo))
            (reader,) = pack_readers
            assert reader.buffered_packs == len(pack_files(repo)) and reader.direct_packs == 0
            assert [p.affects for p in result.problems] == [
                [f"a/{rp} d0-flat.vmdk bytes {3 * MiB}-{3 * MiB + CS - 1}"]
            ]
        finally:
            subprocess.run(["umount", str(mnt)], check=True)

    def test_index_location_past_the_end_of_its_pack(self, two_rps: Fixture) -> None:
        """A record the index places across the pack's end is named as cut short, not read on."""
        repo, _img, ids = two_rps
        pack, _offset, stored = chunk_record(repo, "web", ids[0], 3 * MiB)
        end = pack.stat().st_size
        with Repository.open(str(repo)) as r:
            info = r.resolve("web", ids[0]).disk("d0")
            assert info is not None
            ref = r.map_reader(info).ref_at(3 * MiB // CS)
            key = object_key(RecordType.CHUNK, ref)
            moved = encode_location(bytes.fromhex(pack.stem), end - 100, stored, CS)
            r.index.write(lambda t: t.put(key, moved, db=r.index.dbs["objects"]))
        result = verify_repository(str(repo))
        (problem,) = result.problems
        needs = RECORD_HEADER_SIZE + stored
        assert f"offset {end - 100}: truncated: the record needs {needs} bytes" in problem.message
        assert f"the pack ends at {end}" in problem.message
        for rp in ids:
            want = f"web/{rp} d0-flat.vmdk bytes {3 * MiB}-{3 * MiB + CS - 1}"
            assert want in problem.affects

    def test_chunk_missing_from_the_index_or_of_the_wrong_length(self, tmp_path: Path) -> None:
        """Map references are checked against the index: a lost entry and a wrong length are named.

        Small chunks give the disk several map pages, and it ends in a short
        chunk, which must pass as it is.
        """
        cs = 4096
        repo = new_repo(tmp_path / "repo", chunk_size=cs)
        size = 8 * MiB + 512
        img = make_image(tmp_path / "a.img", size, [(0, noise(size, 6))])
        rp = ingest_here(repo, "a", {"d0": img})
        clean = verify_repository(str(repo))
        assert clean.ok and clean.pages > 2
        with Repository.open(str(repo)) as r:
            info = r.resolve("a", rp).disk("d0")
            assert info is not None
            refs = r.map_reader(info)
            lost = object_key(RecordType.CHUNK, refs.ref_at(1))
            short = object_key(RecordType.CHUNK, refs.ref_at(5))
            objects = r.index.dbs["objects"]

            def damage(t: lmdb.Transaction) -> None:
                t.delete(lost, db=objects)
                pack, offset, stored, _raw = location_fields(t.get(short, db=objects))
                t.put(short, encode_location(pack, offset, stored, cs - 1), db=objects)

            r.index.write(damage)
        result = verify_repository(str(repo))
        found = {p.message: p.affects for p in result.problems}
        assert found.get("is not in the index") == [f"a/{rp} d0-flat.vmdk bytes {cs}-{2 * cs - 1}"]
        wrong = f"is {cs - 1} bytes long where the map needs {cs}"
        assert found.get(wrong) == [f"a/{rp} d0-flat.vmdk bytes {5 * cs}-{6 * cs - 1}"]

    def test_damaged_map_page_affects_its_whole_range(
        self, two_rps: tuple[Path, Path, list[str]]
    ) -> None:
        """A damaged map page makes every chunk below it unreadable, and verify says so."""
        repo, _img, ids = two_rps
        with Repository.open(str(repo)) as r:
            rp = r.resolve("web", ids[1])
            root = rp.disks[0].map.root
            loc = r.index.locate(RecordType.PAGE, root)
            assert loc is not None
            pack = Path(r.packs.path_of(loc.pack_id))
        flip_byte(pack, loc.offset + RECORD_HEADER_SIZE + 10)
        proc = repofs("verify", repo, check=False)
        assert proc.returncode == 5
        assert "PROBLEM map page" in proc.stdout
        assert f"affects web/{ids[1]} d0-flat.vmdk bytes 0-{8 * MiB - 1}" in proc.stdout
        assert f"affects web/{ids[0]}" not in proc.stdout  # its own root page is fine

    def test_missing_and_truncated_packs(self, two_rps: Fixture) -> None:
        """A deleted pack and a truncated pack are named, with the ranges they take away."""
        repo, _img, ids = two_rps
        pack_a, _o, _s = chunk_record(repo, "web", ids[0], 0)
        pack_b, off_b, _s = chunk_record(repo, "web", ids[1], MiB)
        assert pack_a != pack_b
        pack_a.unlink()
        os.truncate(pack_b, off_b + 10)
        proc = repofs("verify", repo, check=False)
        assert proc.returncode == 5
        out = proc.stdout
        assert re.search(
            rf"PROBLEM pack {pack_a.stem}: is missing\n"
            rf"    affects web/{ids[0]} d0-flat.vmdk bytes 0-",
            out,
        ), out
        assert re.search(
            rf"PROBLEM pack {pack_b.stem}: is truncated.*\n"
            rf"    affects web/{ids[1]} d0-flat.vmdk bytes 0-",
            out,
        ), out

    def test_corrupt_config_blob_names_the_file(self, tmp_path: Path) -> None:
        """A damaged VM configuration file is reported by restore point and file name."""
        repo = new_repo(tmp_path / "repo")
        img = make_image(tmp_path / "a.img", MiB, [(0, noise(4096, 1))])
        vmx = tmp_path / "app.vmx"
        vmx.write_text('displayName = "app"\n' * 50)
        rp = ingest_here(repo, "app", {"d0": img}, configs=(vmx,))
        with Repository.open(str(repo)) as r:
            digest = bytes.fromhex(r.resolve("app", rp).configs[0].digest)
            loc = r.index.locate(RecordType.BLOB, digest)
            assert loc is not None
            pack = Path(r.packs.path_of(loc.pack_id))
        flip_byte(pack, loc.offset + RECORD_HEADER_SIZE + 3)
        result = verify_repository(str(repo))
        assert not result.ok
        assert any(f"app/{rp} config file app.vmx" in a for p in result.problems for a in p.affects)

    def test_vm_option_checks_only_that_vm(self, tmp_path: Path) -> None:
        """--vm re-hashes only what that VM reaches; damage elsewhere does not fail it."""
        repo = new_repo(tmp_path / "repo")
        a = make_image(tmp_path / "a.img", MiB, [(0, noise(MiB, 1))])
        b = make_image(tmp_path / "b.img", MiB, [(0, noise(MiB, 2))])
        ingest_here(repo, "a", {"d0": a})
        rp_b = ingest_here(repo, "b", {"d0": b})
        pack, offset, _s = chunk_record(repo, "b", rp_b, 0)
        flip_byte(pack, offset + RECORD_HEADER_SIZE + 1)
        assert verify_repository(str(repo), vm="a").ok
        assert not verify_repository(str(repo), vm="b").ok
        assert not verify_repository(str(repo)).ok
        pack.unlink()  # a lost pack of VM b is b's problem too, not a's
        assert verify_repository(str(repo), vm="a").ok
        assert not verify_repository(str(repo), vm="b").ok

    def test_sample_rehashes_a_fraction(self, two_rps: Fixture) -> None:
        """--sample re-hashes about that share of the chunks and says it sampled."""
        repo, _img, _ids = two_rps
        full = verify_repository(str(repo))
        part = verify_repository(str(repo), sample=20)
        assert part.ok and 0 < part.objects_checked < full.objects_checked
        assert "20% sample" in repofs("verify", repo, "--sample", "20").stdout

    def test_unreferenced_corrupt_chunk_still_fails(self, two_rps: Fixture) -> None:
        """Damage in garbage matters too: a later ingest could deduplicate against it."""
        repo, _img, ids = two_rps
        pack, offset, _s = chunk_record(repo, "web", ids[0], MiB)  # changed in the second
        repofs("prune", repo, "--keep-last", "1")
        flip_byte(pack, offset + RECORD_HEADER_SIZE + 1)
        proc = repofs("verify", repo, check=False)
        assert proc.returncode == 5
        assert "no restore point reaches it" in proc.stdout

    def test_leftovers_and_permissions_are_warnings(self, two_rps: Fixture) -> None:
        """An unindexed pack and a world-readable file are reported but do not fail verify."""
        repo, _img, _ids = two_rps
        src = pack_files(repo)[0]
        stray = src.parent / ("ab" * 16 + ".pack")
        shutil.copy(src, stray)
        os.chmod(repo / "config.json", 0o644)
        proc = repofs("verify", repo)
        assert f"warning: pack {stray.stem} is not in the index" in proc.stdout
        assert "config.json is accessible to others" in proc.stdout


def test_all_ranges_names_every_damaged_range(tmp_path: Path) -> None:
    """Past the first eight ranges verify said "and N more ranges", with no way to see them.

    One chunk stored once and used at ten places of the disk: one damaged record, ten
    ranges."""
    repo = new_repo(tmp_path / "repo")
    with Repository.open(str(repo)) as r:
        chunk = r.config.chunk_size
    block = noise(chunk, 3)
    starts = [k * 4 * chunk for k in range(10)]  # whole other chunks between them
    img = make_image(tmp_path / "a.img", 40 * chunk, [(s, block) for s in starts])
    rp = ingest_here(repo, "a", {"d0": img})
    pack, offset, _stored = chunk_record(repo, "a", rp, 0)
    flip_byte(pack, offset + RECORD_HEADER_SIZE + 9)
    short = repofs("verify", repo, check=False).stdout
    assert "and 2 more ranges (--all-ranges names them)" in short, short
    full = repofs("verify", repo, "--all-ranges", check=False)
    assert full.returncode == 5 and "more ranges" not in full.stdout
    named = ", ".join(f"{s}-{s + chunk - 1}" for s in starts)
    assert f"a/{rp} d0-flat.vmdk bytes {named}" in full.stdout, full.stdout


class TestBrokenIndex:
    def test_missing_index_names_the_restore_points(self, two_rps: Fixture) -> None:
        """Without data.mdb, verify scans the packs and names what cannot be read now."""
        repo, _img, ids = two_rps
        (repo / "index" / "data.mdb").unlink()
        proc = repofs("verify", repo, check=False)
        assert proc.returncode == 5
        assert "PROBLEM index" in proc.stdout and "rebuild-index" in proc.stdout
        for rp in ids:
            assert f"affects web/{rp} (unreadable until the index is rebuilt)" in proc.stdout

    def test_overwritten_index_names_the_restore_points(
        self, two_rps: tuple[Path, Path, list[str]]
    ) -> None:
        """Garbage over LMDB's meta pages: verify still names every restore point the packs hold."""
        repo, _img, ids = two_rps
        with open(repo / "index" / "data.mdb", "r+b") as f:
            f.write(noise(8192, 9))
        proc = repofs("verify", repo, check=False)
        assert_one_line_error(proc, "verify found 1 problem")
        assert "PROBLEM index" in proc.stdout
        for rp in ids:
            assert f"web/{rp}" in proc.stdout

    def test_pruned_restore_points_are_not_named(self, two_rps: Fixture) -> None:
        """The pack scan honours tombstones: a pruned restore point is not listed as lost."""
        repo, _img, ids = two_rps
        repofs("prune", repo, "--keep-last", "1")
        (repo / "index" / "data.mdb").unlink()
        out = repofs("verify", repo, check=False).stdout
        assert f"web/{ids[1]}" in out and f"web/{ids[0]}" not in out


class TestBadInput:
    @pytest.mark.parametrize(
        "args,needle",
        [
            (["--sample", "0"], "--sample"),
            (["--sample", "101"], "--sample"),
            (["--sample", "lots"], "lots"),
            (["--vm", "a/b"], "must not contain"),
            (["--vm", "ghost"], "unknown VM"),
        ],
    )
    def test_one_line_errors(
        self, two_rps: tuple[Path, Path, list[str]], args: list[str], needle: str
    ) -> None:
        """Bad options get one line and a non-zero exit, never a traceback."""
        repo, _img, _ids = two_rps
        assert_one_line_error(repofs("verify", repo, *args, check=False), needle)

    def test_not_a_repository(self, tmp_path: Path) -> None:
        """verify of a directory that is no repository says so in one line."""
        assert_one_line_error(repofs("verify", tmp_path, check=False), "not a repofs repository")
        proc = repofs("verify", tmp_path / "nope", check=False)
        assert_one_line_error(proc, "no such repository")

    def test_ids_unchanged_by_verify(self, two_rps: Fixture) -> None:
        """verify writes nothing: the restore points are what they were."""
        repo, _img, ids = two_rps
        repofs("verify", repo)
        assert rp_ids(repo) == ids
