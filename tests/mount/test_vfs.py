"""The mounted tree's model, driven in-process without a kernel mount."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest

from repofs.errors import IntegrityError
from repofs.mount.vfs import ROOT_INODE, NotFound, RepoView
from repofs.store.config import PAGE_REFS
from repofs.store.maps import NotCached
from repofs.store.records import RecordType
from repofs.store.repository import Repository
from tests.support.helpers import ingest, make_image, repofs

MiB = 1 << 20


@pytest.fixture
def view(tmp_path: Path, repo: Path) -> RepoView:
    img = make_image(tmp_path / "d.img", 2 * MiB + 512, [(0, os.urandom(MiB))])
    ingest(repo, "vm", f"d={img}")
    ingest(repo, "vm", f"d={img}")
    return RepoView(Repository.open(str(repo)), cache_bytes=8 * MiB)


class TestRepoView:
    def test_tree_shape(self, view: RepoView) -> None:
        """Root lists VMs; a VM lists its restore points and latest; a restore point its files."""
        ((vm_name, vm_attr),) = view.listdir(ROOT_INODE)
        assert vm_name == "vm" and stat.S_ISDIR(vm_attr.mode)
        names = [n for n, _ in view.listdir(vm_attr.ino)]
        assert names[-1] == "latest" and len(names) == 3
        assert view.readlink(view.lookup(vm_attr.ino, "latest").ino) == names[1]
        rp = view.lookup(vm_attr.ino, names[0])
        files = dict(view.listdir(rp.ino))
        assert set(files) == {"d.vmdk", "d-flat.vmdk"}
        assert files["d-flat.vmdk"].size == 2 * MiB + 512 and files["d-flat.vmdk"].immutable

    def test_unknown_names_and_inodes(self, view: RepoView) -> None:
        """Lookups of things that do not exist are NotFound, never another error."""
        with pytest.raises(NotFound):
            view.lookup(ROOT_INODE, "ghost")
        with pytest.raises(NotFound):
            view.getattr(999 << 16)
        vm = view.lookup(ROOT_INODE, "vm")
        with pytest.raises(NotFound):
            view.lookup(vm.ino, "2001-01-01T000000Z")

    def test_damaged_chunk_is_an_error_not_bytes(self, view: RepoView) -> None:
        """A flipped byte in a pack makes the read fail; nothing else comes back."""
        vm = view.lookup(ROOT_INODE, "vm")
        rp = view.lookup(vm.ino, view.readlink(view.lookup(vm.ino, "latest").ino))
        flat = view.lookup(rp.ino, "d-flat.vmdk")
        packs = list(Path(view.repo.path, "packs").glob("*/*.pack"))
        for pack in packs:
            data = bytearray(pack.read_bytes())
            data[200] ^= 0xFF  # inside the first record's payload
            pack.write_bytes(bytes(data))
        with pytest.raises(IntegrityError):
            view.read(flat.ino, 0, 65536)
        assert view.read(flat.ino, MiB + 4096, 4096) == bytes(4096)  # a hole still reads

    def test_reads_clip_at_the_end(self, view: RepoView) -> None:
        """A read past the end returns what is there and no padding."""
        vm = view.lookup(ROOT_INODE, "vm")
        rp = view.lookup(vm.ino, view.readlink(view.lookup(vm.ino, "latest").ino))
        flat = view.lookup(rp.ino, "d-flat.vmdk")
        assert len(view.read(flat.ino, flat.size - 100, 4096)) == 100
        assert view.read(flat.ino, flat.size, 4096) == b""


def test_progress_bar_on_a_terminal(tmp_path: Path, repo: Path) -> None:
    """On a terminal ingest draws bytes done, MB/s and ETA on stderr; in a pipe it is silent."""
    img = make_image(tmp_path / "d.img", 64 * MiB, [(0, os.urandom(64 * MiB))])
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    import sys

    cmd = f"{sys.executable} -m repofs ingest {repo} --vm v d={img}"
    out = subprocess.run(
        ["script", "-qec", cmd, "/dev/null"], capture_output=True, text=True, env=env
    )
    assert out.returncode == 0, out.stdout
    assert "MB/s" in out.stdout and "ETA" in out.stdout and "64.0 MiB" in out.stdout
    piped = subprocess.run(
        [sys.executable, "-m", "repofs", "ingest", str(repo), "--vm", "v", f"d={img}"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert "ETA" not in piped.stderr


def test_prefetched_runs_skip_a_damaged_chunk_only(tmp_path: Path, repo: Path) -> None:
    """A sequential reader's coalesced pack reads: a bad chunk mid-run fails alone.

    The chunks around it, loaded by the same pack read, return their bytes;
    the memory-only path answers nothing it has not verified.
    """
    payload = os.urandom(4 * MiB)
    img = make_image(tmp_path / "d.img", 4 * MiB, [(0, payload)])
    ingest(repo, "vm", f"d={img}")
    r = Repository.open(str(repo))
    (rp,) = r.restore_points()
    cs = r.config.chunk_size
    bad = (MiB + MiB // 4) // cs  # a chunk in the middle of the first 2 MiB run
    loc = r.index.locate(RecordType.CHUNK, r.map_reader(rp.disks[0]).ref_at(bad))
    assert loc is not None
    pack = r.packs.path_of(loc.pack_id)
    with open(pack, "r+b") as f:
        f.seek(loc.offset + 100)
        byte = f.read(1)
        f.seek(loc.offset + 100)
        f.write(bytes([byte[0] ^ 0xFF]))
    view = RepoView(r, cache_bytes=64 * MiB)
    try:
        vm = view.lookup(ROOT_INODE, "vm")
        flat = view.lookup(view.lookup(vm.ino, rp.id).ino, "d-flat.vmdk")
        assert view.read_cached(flat.ino, 0, MiB) is None  # nothing opened or loaded yet
        for i in range(4 * MiB // cs):
            if i == bad:
                with pytest.raises(IntegrityError):
                    view.read(flat.ino, i * cs, cs)
            else:
                assert view.read(flat.ino, i * cs, cs) == payload[i * cs : (i + 1) * cs], i
        # sequential reads loaded the chunks ahead: memory answers them, never the bad one
        assert view.read_cached(flat.ino, (bad + 1) * cs, cs) == payload[(bad + 1) * cs :][:cs]
        assert view.read_cached(flat.ino, bad * cs, cs) is None
    finally:
        view.close()
        r.close()


def test_opening_a_disk_warms_its_map_and_the_index(tmp_path: Path) -> None:
    """warm() loads every page of the opened disk's map in the background; the index warms whole.

    The map has several pages, and a read alone loads only its own: the
    pages past the first can only be in memory because the warm-up loaded them.
    """
    repo = tmp_path / "repo"
    repofs("init", repo, "--chunk-size", "4K")
    span = PAGE_REFS * 4096  # the disk bytes one map page covers
    pages = 4
    img = make_image(
        tmp_path / "d.img", pages * span, [(k * span, os.urandom(4096)) for k in range(pages)]
    )
    ingest(repo, "vm", f"d={img}")
    view = RepoView(Repository.open(str(repo)), cache_bytes=8 * MiB)
    try:
        vm = view.lookup(ROOT_INODE, "vm")
        rp = view.lookup(vm.ino, view.readlink(view.lookup(vm.ino, "latest").ino))
        flat = view.lookup(rp.ino, "d-flat.vmdk")
        desc = view.lookup(rp.ino, "d.vmdk")
        view.warm(desc.ino)  # a descriptor has no map: nothing to do, nothing raised
        assert view.read(flat.ino, 0, 4096)  # not warmed: this read loads its own page only
        reader = next(iter(view._readers.values()))
        n = reader.disk.n_chunks
        assert n == pages * PAGE_REFS
        with pytest.raises(NotCached):
            reader.map.refs(0, n, load=False)
        view.warm(flat.ino)
        assert view.read(flat.ino, 0, 4096)  # the first read after warm() starts the warm-up
        view.prefetcher._pool.shutdown(wait=True)  # let the background work finish
        assert len(reader.map.refs(0, n, load=False)) == n  # every page is cached now
        assert view.repo.index.warm(1 << 30) is True
        assert view.repo.index.warm(1) is False  # larger than the budget: left to the kernel
    finally:
        view.close()
        view.repo.close()
