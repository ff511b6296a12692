"""rebuild-index: the index again from the packs alone, mounting and reading identically."""

from __future__ import annotations

import contextlib
import mmap
import os
import shutil
import time
from pathlib import Path

import pytest

from repofs.errors import IntegrityError, RepositoryError
from repofs.store.records import RECORD_HEADER_SIZE, RecordType
from repofs.store.repository import Repository
from tests.support import maint
from tests.support.helpers import assert_one_line_error, make_image, mounted, qemu_compare, repofs
from tests.support.maint import MiB, flip_byte, ingest_here, new_repo, noise, read_range, rp_ids


def tree(root: Path) -> dict[str, tuple[int, int, int, int]]:
    """Every entry of a mounted tree: inode, mode, size, mtime."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            out[str(p.relative_to(root))] = (st.st_ino, st.st_mode, st.st_size, st.st_mtime_ns)
    return out


@pytest.fixture
def populated(tmp_path: Path) -> tuple[Path, dict[tuple[str, str], Path]]:
    """Two VMs, four restore points (one pruned), a config file; sources kept per restore point."""
    repo = new_repo(tmp_path / "repo")
    sources: dict[tuple[str, str], Path] = {}
    img = make_image(tmp_path / "web.img", 6 * MiB + 512, [(0, noise(2 * MiB, 1))])
    vmx = tmp_path / "web.vmx"
    vmx.write_text("memsize = 4096\n")
    for k in range(3):
        with open(img, "r+b") as f:
            f.seek(3 * MiB + k * 100_000)
            f.write(noise(150_000, 10 + k))
        rp = ingest_here(repo, "web", {"d0": img}, configs=(vmx,), now=1_700_000_000 + k * 3600)
        sources[("web", rp)] = shutil.copy(img, tmp_path / f"web-{k}.img")
    db = make_image(tmp_path / "db.img", 3 * MiB, [(MiB, noise(MiB, 7))])
    rp = ingest_here(repo, "db", {"d0": db}, now=1_700_000_500)
    sources[("db", rp)] = db
    first = min(k for k in sources if k[0] == "web")
    repofs("prune", repo, "--vm", "web", "--keep-last", "2")
    del sources[first]
    return repo, sources


class TestRebuild:
    def test_rebuilt_repository_mounts_and_reads_identically(
        self, tmp_path: Path, populated: tuple[Path, dict[tuple[str, str], Path]]
    ) -> None:
        """Same listing, same inode numbers and times, same bytes (qemu-img compare) after a
        rebuild from the packs alone; the next ingest gets a new, higher sequence number."""
        repo, sources = populated
        with mounted(repo, tmp_path / "m1") as mnt:
            before = tree(mnt)
        with Repository.open(str(repo)) as r:
            old_max = max(rp.seq for rp in r.restore_points())
        shutil.rmtree(repo / "index")
        proc = repofs("verify", repo, check=False)
        assert proc.returncode == 5 and "rebuild-index" in proc.stdout
        out = repofs("rebuild-index", repo).stdout
        assert "3 restore point(s) of 2 VM(s), 1 pruned one(s) left out" in out
        assert sorted(rp_ids(repo)) == sorted(rp for _vm, rp in sources)
        repofs("verify", repo)
        with mounted(repo, tmp_path / "m2") as mnt:
            assert tree(mnt) == before
            for (vm, rp), src in sources.items():
                qemu_compare(src, mnt / vm / rp / "d0.vmdk")
            assert (
                mnt / "web" / max(rp for vm, rp in sources if vm == "web") / "web.vmx"
            ).read_text() == "memsize = 4096\n"
        img = make_image(tmp_path / "new.img", MiB, [(0, noise(4096, 3))])
        new = ingest_here(repo, "web", {"d0": img})
        with Repository.open(str(repo)) as r:
            assert r.resolve("web", new).seq > old_max

    def test_ignores_packs_of_another_repository(
        self, tmp_path: Path, populated: tuple[Path, dict]
    ) -> None:  # type: ignore[type-arg]
        """A pack copied in from another repository is reported and left out."""
        repo, sources = populated
        other = new_repo(tmp_path / "other")
        img = make_image(tmp_path / "o.img", MiB, [(0, noise(MiB, 42))])
        ingest_here(other, "intruder", {"d0": img})
        for p in (other / "packs").glob("??/*.pack"):
            dest = repo / "packs" / p.parent.name
            dest.mkdir(mode=0o700, exist_ok=True)
            shutil.copy(p, dest / p.name)
        out = repofs("rebuild-index", repo).stdout
        with Repository.open(str(other)) as r:
            assert f"belongs to repository {r.config.repository_id}" in out
        assert "intruder" not in repofs("list", repo).stdout
        assert sorted(rp_ids(repo)) == sorted(rp for _vm, rp in sources)

    def test_resyncs_past_a_damaged_record_header(self, tmp_path: Path) -> None:
        """A damaged header costs that record only: the scan finds the next one by its magic."""
        repo = new_repo(tmp_path / "repo")
        data = noise(4 * MiB, 5)
        img = make_image(tmp_path / "a.img", 4 * MiB, [(0, data)])
        rp = ingest_here(repo, "a", {"d0": img})
        pack, offset, _stored = maint.chunk_record(repo, "a", rp, 2 * MiB)
        flip_byte(pack, offset + 20)  # inside the header: its CRC no longer holds
        proc = repofs("rebuild-index", repo, check=False)
        out = proc.stdout
        assert proc.returncode == 5, "a rebuild that leaves a restore point incomplete says so"
        assert "damaged: pack" in out and "skipped" in out
        assert "incomplete: a/" in out
        assert_one_line_error(proc, "the index is rebuilt, but 1 restore point(s) are incomplete")
        assert rp_ids(repo) == [rp]
        proc = repofs("verify", repo, check=False)
        assert proc.returncode == 5
        assert f"a/{rp} d0-flat.vmdk bytes {2 * MiB}-{2 * MiB + 65535}" in proc.stdout
        assert read_range(repo, "a", rp, 0, 2 * MiB) == data[: 2 * MiB]
        after = 2 * MiB + 65536
        assert read_range(repo, "a", rp, after, MiB) == data[after : after + MiB]

    def test_drops_corrupt_and_truncated_records(self, tmp_path: Path) -> None:
        """Records whose content is wrong, or cut off, leave the index; the rest stays readable."""
        repo = new_repo(tmp_path / "repo")
        data = noise(4 * MiB, 6)
        img = make_image(tmp_path / "a.img", 4 * MiB, [(0, data)])
        rp = ingest_here(repo, "a", {"d0": img})
        pack, offset, _s = maint.chunk_record(repo, "a", rp, MiB)
        flip_byte(pack, offset + RECORD_HEADER_SIZE + 7)
        with Repository.open(str(repo)) as r:
            loc = r.index.locate(RecordType.PAGE, r.resolve("a", rp).disks[0].map.root)
            assert loc is not None
        out = repofs("rebuild-index", repo, check=False).stdout
        assert (  # a sealed record fails its tag first
            "content does not match its digest (record dropped)" in out
            or "does not authenticate (tampered with, or another object) (record dropped)" in out
        )
        with Repository.open(str(repo)) as r:
            assert r.index.locate(RecordType.PAGE, r.resolve("a", rp).disks[0].map.root) is not None
        assert read_range(repo, "a", rp, 0, MiB) == data[:MiB]
        os.truncate(pack, offset + 100)  # the chunk at 1 MiB and everything after it
        out = repofs("rebuild-index", repo, check=False).stdout
        assert "truncated" in out and f"incomplete: a/{rp}" in out
        assert rp_ids(repo) == [rp]  # its own record is in another pack; its map was cut off
        with pytest.raises(IntegrityError):
            read_range(repo, "a", rp, 0, 4096)

    def test_waits_for_a_running_ingest(self, tmp_path: Path) -> None:
        """rebuild-index takes the repository exclusively: it says it waits, then includes the
        restore point the ingest committed meanwhile."""
        from tests.support.helpers import spawn
        from tests.support.maint import wait_for_line

        repo = new_repo(tmp_path / "repo")
        img = make_image(tmp_path / "a.img", MiB, [(0, noise(MiB, 1))])
        ingest = spawn(
            "ingest", repo, "--vm", "a", f"d0={img}", env={"REPOFS_TEST_PAUSE_BEFORE_COMMIT": "2"}
        )
        wait_for_line(ingest, "pausing before commit")
        proc = repofs("rebuild-index", repo)
        out, _err = ingest.communicate(timeout=60)
        assert ingest.returncode == 0
        assert "repofs: waiting: the repository is in use" in proc.stderr
        assert rp_ids(repo) == [out.strip().splitlines()[-1]]

    def test_old_handles_cannot_write_after_a_rebuild(self, tmp_path: Path) -> None:
        """A process that opened the index before the rebuild cannot commit into the old one."""
        repo = new_repo(tmp_path / "repo")
        with Repository.open(str(repo)) as r:
            repofs("rebuild-index", repo)
            with pytest.raises(RepositoryError, match="replaced"):
                r.reserve("vm")

    def test_not_a_repository(self, tmp_path: Path) -> None:
        """rebuild-index refuses a directory without a config, in one line."""
        assert_one_line_error(
            repofs("rebuild-index", tmp_path, check=False), "not a repofs repository"
        )


def read_direct(fd: int) -> bytes:
    """The whole open file through the daemon (``O_DIRECT``: no page cache of the mount)."""
    buf = mmap.mmap(-1, max(os.fstat(fd).st_size, 4096))
    return bytes(buf[: os.preadv(fd, [buf], 0)])


def test_a_running_mount_follows_a_rebuilt_index(tmp_path: Path) -> None:
    """A mount that stays up through rebuild-index and a gc that moves chunks keeps reading
    every restore point's bytes, and shows restore points committed afterwards."""
    repo = new_repo(tmp_path / "repo")
    shared, old = noise(2 * MiB, 1), noise(2 * MiB, 2)
    first_img = make_image(tmp_path / "a.img", 4 * MiB, [(0, old), (2 * MiB, shared)])
    ingest_here(repo, "vm", {"d0": first_img}, now=1_700_000_000)
    second_img = make_image(
        tmp_path / "b.img", 4 * MiB, [(0, noise(2 * MiB, 3)), (2 * MiB, shared)]
    )
    second = ingest_here(repo, "vm", {"d0": second_img}, now=1_700_000_100)
    with contextlib.ExitStack() as stack:
        mnt = stack.enter_context(mounted(repo, tmp_path / "mnt"))
        assert sorted(p.name for p in (mnt / "vm").iterdir()) == [
            "2023-11-14T221320Z",
            second,
            "latest",
        ]
        # Opened before, read after: the read itself meets the moved chunks first.
        fd = os.open(mnt / "vm" / second / "d0-flat.vmdk", os.O_RDONLY | os.O_DIRECT)
        stack.callback(os.close, fd)
        repofs("prune", repo, "--keep-last", "1")
        repofs("rebuild-index", repo)
        out = repofs("gc", repo).stdout  # moves the second one's shared chunks out of the
        assert "rewrote 1" in out, out  # first one's pack, then deletes that pack
        third_img = make_image(tmp_path / "c.img", 4 * MiB, [(0, noise(4 * MiB, 4))])
        assert read_direct(fd) == second_img.read_bytes()
        third = repofs("ingest", repo, "--vm", "vm", f"d0={third_img}").stdout.split()[-1]
        deadline = time.monotonic() + 10
        while third not in {p.name for p in (mnt / "vm").iterdir()}:
            assert time.monotonic() < deadline, "the new restore point never showed up"
            time.sleep(0.2)
        fd3 = os.open(mnt / "vm" / third / "d0-flat.vmdk", os.O_RDONLY | os.O_DIRECT)
        stack.callback(os.close, fd3)
        assert read_direct(fd3) == third_img.read_bytes()
    log = (tmp_path / "mnt.log").read_text()
    assert "the index was replaced (rebuild-index)" in log and "I/O error" not in log, log


@pytest.mark.parametrize("damage", ["pack deleted", "record flipped"])
def test_a_restore_point_whose_record_is_lost_is_written_again_from_the_old_index(
    tmp_path: Path, damage: str
) -> None:
    """The record of a restore point is lost but its data is whole: rebuild-index used to
    drop it without a word (and gc would then free its data).  With the old index still
    readable, the record is written again, and later rebuilds from the packs alone keep it."""
    repo = new_repo(tmp_path / "repo")
    img = make_image(tmp_path / "a.img", 2 * MiB, [(0, noise(2 * MiB, 1))])
    ids = [ingest_here(repo, "vm", {"d0": img}, now=1_700_000_000 + k) for k in range(2)]
    expected = img.read_bytes()
    lost = ids[1]  # deduplicated whole: its last pack holds its record alone
    with Repository.open(str(repo)) as r:
        record = r.resolve("vm", lost).record
        assert record is not None
        pack = Path(r.packs.path_of(bytes.fromhex(record[0])))
    if damage == "pack deleted":
        pack.unlink()
    else:
        flip_byte(pack, record[1] + RECORD_HEADER_SIZE + 3)
        proc = repofs("verify", repo, check=False)
        assert proc.returncode != 0 and f"vm/{lost}: its own record" in proc.stdout

    out = repofs("rebuild-index", repo).stdout
    assert f"rewritten: vm/{lost}" in out, out
    assert rp_ids(repo, "vm") == ids
    repofs("gc", repo)
    shutil.rmtree(repo / "index")  # now from the packs alone
    repofs("rebuild-index", repo)
    assert rp_ids(repo, "vm") == ids
    for rp in ids:
        assert read_range(repo, "vm", rp, 0, 2 * MiB) == expected
    repofs("verify", repo)
