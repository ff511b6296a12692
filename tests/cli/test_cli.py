"""The CLI as an administrator meets it: real subprocesses, real files, qemu as the reference."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from ingest.pipeline import MAX_CONFIG_BYTES
from tests.support.helpers import (
    assert_one_line_error,
    cli_env,
    ingest,
    make_image,
    not_a_small_regular_file,
    repofs,
    skip_unless_holes,
)

MiB = 1 << 20


class TestInit:
    def test_creates_owner_only_repository(self, tmp_path: Path) -> None:
        """init makes a 0700 repository with a versioned config (3: encrypted by default)."""
        repofs("init", tmp_path / "r", "--chunk-size", "128K", "--compression", "zstd:5")
        cfg = json.loads((tmp_path / "r" / "config.json").read_text())
        assert (
            cfg["version"] == 3 and cfg["chunk_size"] == 131072 and cfg["compression"] == "zstd:5"
        )
        assert stat.S_IMODE(os.stat(tmp_path / "r").st_mode) == 0o700
        assert stat.S_IMODE(os.stat(tmp_path / "r" / "key").st_mode) == 0o600

    def test_refuses_existing_repository_and_nonempty_dir(self, tmp_path: Path, repo: Path) -> None:
        """init never touches something that already holds data."""
        before = sorted(p.name for p in repo.iterdir())
        assert_one_line_error(repofs("init", repo, check=False), "already exists")
        assert sorted(p.name for p in repo.iterdir()) == before
        (tmp_path / "full").mkdir()
        (tmp_path / "full" / "f").write_text("x")
        assert_one_line_error(repofs("init", tmp_path / "full", check=False), "not empty")

    @pytest.mark.parametrize(
        "args,needle",
        [
            (["--chunk-size", "3K"], "power of two"),
            (["--chunk-size", "8M"], "power of two"),
            (["--chunk-size", "2K"], "power of two"),
            (["--compression", "lz4"], "compression"),
            (["--compression", "zstd:99"], "range"),
            (["--chunk-size", ""], "--chunk-size is empty"),
            (["--chunk-size", " "], "--chunk-size is empty"),
        ],
    )
    def test_bad_options(self, tmp_path: Path, args: list[str], needle: str) -> None:
        """Bad chunk sizes and codecs are one-line errors, and create nothing."""
        assert_one_line_error(repofs("init", tmp_path / "r", *args, check=False), needle)
        assert not (tmp_path / "r").exists()


class TestDamagedConfig:
    @pytest.mark.parametrize(
        "field,value,needle",
        [
            ("compression", 3, "not a string"),
            ("compression", None, "not a string"),
            ("compression", "zstd:99", "out of range"),
            ("pack_target_size", "abc", "not an integer"),
            ("pack_target_size", 0, "out of range"),
            ("pack_target_size", -1, "out of range"),
            ("pack_target_size", 1 << 40, "out of range"),
            ("version", True, "not an integer"),
            ("version", 1.0, "not an integer"),
            ("version", 4, "written by a newer repofs"),
            ("version", 0, "not supported"),
            ("chunk_size", True, "not an integer"),
            ("chunk_size", 131072.0, "not an integer"),
            ("page_refs", "1024", "not an integer"),
            ("page_refs", False, "not an integer"),
            ("repository_id", 10**31, "not a string"),
            ("repository_id", None, "not a string"),
            ("format", 1, "format field"),
            ("page_refs", "<missing>", "missing"),
        ],
    )
    def test_every_field_is_checked(
        self, tmp_path: Path, repo: Path, field: str, value: object, needle: str
    ) -> None:
        """A field of the wrong type or range is one line naming it, never a traceback."""
        path = repo / "config.json"
        cfg = json.loads(path.read_text())
        if value == "<missing>":
            del cfg[field]
        else:
            cfg[field] = value
        path.write_text(json.dumps(cfg))
        img = make_image(tmp_path / "d.img", MiB, [(0, b"x")])
        for args in (["list", repo], ["stats", repo], ["ingest", repo, "--vm", "v", f"d={img}"]):
            p = repofs(*args, check=False)
            assert_one_line_error(p, "config.json", needle)
            assert p.returncode == 3, p.stderr
            if needle != "format field":
                assert field in p.stderr

    def test_extremes_of_the_ranges_still_open(self, tmp_path: Path, repo: Path) -> None:
        """The range limits are inclusive: a config at each of them is accepted."""
        path = repo / "config.json"
        cfg = json.loads(path.read_text())
        img = make_image(tmp_path / "d.img", MiB, [(0, os.urandom(MiB))])
        for size in (1 << 20, 256 << 20):
            cfg["pack_target_size"] = size
            path.write_text(json.dumps(cfg))
            ingest(repo, "v", f"d={img}")


class TestEmptyPaths:
    def test_empty_repository_path(self, tmp_path: Path) -> None:
        """'' is said to be empty, not ': No such file or directory', and creates nothing."""
        for args in (["init", ""], ["list", ""], ["stats", ""], ["verify", ""]):
            p = subprocess.run(
                [sys.executable, "-m", "repofs", *args],
                cwd=tmp_path,
                capture_output=True,
                text=True,
                env=cli_env(),
                timeout=60,
            )
            assert_one_line_error(p, "repository path is empty")
            assert p.returncode == 2
        assert list(tmp_path.iterdir()) == []

    def test_empty_mount_point(self, repo: Path) -> None:
        """mount and umount say the mount point is empty before trying anything."""
        for args in (["mount", repo, ""], ["umount", ""]):
            assert_one_line_error(repofs(*args, check=False), "mount point path is empty")


class TestList:
    def test_columns_stay_aligned_with_long_vm_names(self, tmp_path: Path, repo: Path) -> None:
        """A VM name past 16 characters pushed the rest of its row out of line."""
        img = make_image(tmp_path / "d.img", MiB, [(0, b"x" * 4096)])
        ids = [ingest(repo, vm, f"d={img}") for vm in ("web", "a-vm-with-a-long-name-01")]
        header, *rows = repofs("list", repo).stdout.splitlines()
        columns = {row.index(rp) for row in rows for rp in ids if rp in row}
        assert len(rows) == 2 and columns == {header.index("RESTORE POINT")}


class TestIngest:
    def test_round_trip_odd_size_and_configs(self, tmp_path: Path, repo: Path) -> None:
        """A disk of odd size and its config files come back byte for byte (see test_mount)."""
        img = make_image(
            tmp_path / "d.img", 3 * MiB + 1000, [(0, os.urandom(5000)), (2 * MiB, b"z" * 70000)]
        )
        vmx = tmp_path / "web.vmx"
        vmx.write_text('displayName = "web"\n')
        rp = ingest(repo, "web", f"disk0={img}", extra=("--config", str(vmx)))
        listing = json.loads(repofs("list", repo, "web", "--json").stdout)
        assert [p["id"] for p in listing] == [rp]
        disk = listing[0]["disks"][0]
        assert disk["capacity"] == 3 * MiB + 1024  # rounded up to whole sectors
        assert listing[0]["configs"] == ["web.vmx"]

    def test_dedup_across_vms_shows_in_stats(self, tmp_path: Path, repo: Path) -> None:
        """Two VMs cloned from one template store the shared data once."""
        shared = os.urandom(4 * MiB)
        a = make_image(tmp_path / "a.img", 16 * MiB, [(0, shared), (8 * MiB, os.urandom(MiB))])
        b = make_image(tmp_path / "b.img", 16 * MiB, [(0, shared), (8 * MiB, os.urandom(MiB))])
        ingest(repo, "vm-a", f"d={a}")
        out = repofs("ingest", repo, "--vm", "vm-b", f"d={b}").stdout
        assert "stored 1.0 MiB new" in out
        s = json.loads(repofs("stats", repo, "--json").stdout)
        assert s["allocated_bytes"] == 10 * MiB and s["unique_bytes"] == 6 * MiB
        assert s["dedup_ratio"] == pytest.approx(10 / 6)
        assert s["vms"] == 2 and s["restore_points"] == 2 and s["pack_count"] >= 1

    def test_sparse_64g_reads_only_data(self, tmp_path: Path, repo: Path) -> None:
        """A 64 GiB sparse image with a little data is ingested without reading its holes."""
        skip_unless_holes(tmp_path)  # else 64 GiB of zeros are read, for minutes
        img = make_image(
            tmp_path / "big.img",
            64 << 30,
            [(0, os.urandom(MiB)), ((40 << 30) + 12345, os.urandom(100))],
        )
        ingest(repo, "big", f"d={img}")
        disk = json.loads(repofs("list", repo, "--json").stdout)[0]["disks"][0]
        assert disk["capacity"] == 64 << 30
        assert disk["bytes_read"] <= MiB + 2 * 65536  # holes were never read

    def test_two_ingests_in_one_second_get_distinct_ids(self, tmp_path: Path, repo: Path) -> None:
        """Ids are unique within a VM and sort in creation order."""
        img = make_image(tmp_path / "d.img", MiB, [(0, b"x")])
        ids = [ingest(repo, "v", f"d={img}") for _ in range(3)]
        assert len(set(ids)) == 3 and ids == sorted(ids)
        listing = json.loads(repofs("list", repo, "--json").stdout)
        assert [p["kind"] for p in listing] == ["full", "incremental", "incremental"]


class TestBadInput:
    def _count(self, repo: Path) -> int:
        return len(json.loads(repofs("list", repo, "--json").stdout))

    @pytest.mark.parametrize(
        "vm", ["a/b", "..", "", "x" * 201, " ", "   ", "\u00a0", " web", "web "]
    )
    def test_bad_vm_name(self, tmp_path: Path, repo: Path, vm: str) -> None:
        """A bad VM name is refused before anything is written."""
        img = make_image(tmp_path / "d.img", MiB, [(0, b"x")])
        assert_one_line_error(
            repofs("ingest", repo, "--vm", vm, f"d={img}", check=False), "VM name"
        )
        assert self._count(repo) == 0

    @pytest.mark.parametrize(
        "disk,needle",
        [(" ", "only whitespace"), (" d", "begins or ends"), ("d ", "begins or ends")],
    )
    def test_disk_and_config_names_with_outer_whitespace(
        self, tmp_path: Path, repo: Path, disk: str, needle: str
    ) -> None:
        """Names that differ from others only by outer blanks are refused for disks and configs."""
        img = make_image(tmp_path / "d.img", MiB, [(0, b"x")])
        p = repofs("ingest", repo, "--vm", "v", f"{disk}={img}", check=False)
        assert_one_line_error(p, "disk name", needle)
        vmx = tmp_path / "web.vmx "
        vmx.write_text("x\n")
        p = repofs("ingest", repo, "--vm", "v", f"d={img}", "--config", vmx, check=False)
        assert_one_line_error(p, "config file name", "begins or ends")
        assert self._count(repo) == 0

    def test_inner_blanks_and_old_names_still_work(self, tmp_path: Path, repo: Path) -> None:
        """Blanks inside a name are fine; a lookup of an odd name is an unknown VM, not an error."""
        img = make_image(tmp_path / "d.img", MiB, [(0, b"x")])
        ingest(repo, "web 01", f"disk 0={img}")
        assert self._count(repo) == 1
        assert_one_line_error(repofs("list", repo, " ", check=False), "unknown VM")

    def test_empty_parent_is_not_latest(self, tmp_path: Path, repo: Path) -> None:
        """--parent '' used to mean the latest restore point; now it is an error."""
        img = make_image(tmp_path / "d.img", MiB, [(0, b"x")])
        ingest(repo, "v", f"d={img}")
        for parent in ("", " "):
            p = repofs("ingest", repo, "--vm", "v", f"d={img}", "--parent", parent, check=False)
            assert_one_line_error(p, "--parent is empty")
            assert p.returncode == 2
        assert self._count(repo) == 1

    def test_missing_source(self, repo: Path, tmp_path: Path) -> None:
        """A source that does not exist names itself."""
        p = repofs("ingest", repo, "--vm", "v", f"d={tmp_path}/nope.img", check=False)
        assert_one_line_error(p, "nope.img", "no such file")

    def test_unreadable_block_device(self, repo: Path, tmp_path: Path) -> None:
        """A block device node with no device behind it is a clear error."""
        dev = tmp_path / "bogus"
        os.mknod(dev, 0o600 | stat.S_IFBLK, os.makedev(240, 77))
        assert_one_line_error(repofs("ingest", repo, "--vm", "v", f"d={dev}", check=False), "bogus")

    def test_fifo_and_character_device_refused(self, repo: Path, tmp_path: Path) -> None:
        """A FIFO is refused at once, not read forever (nor waited on); so is /dev/zero."""
        fifo = tmp_path / "pipe"
        os.mkfifo(fifo)
        for source in (fifo, Path("/dev/zero")):
            p = repofs("ingest", repo, "--vm", "v", f"d={source}", check=False, timeout=30)
            assert_one_line_error(p, str(source), "not a regular file or block device")
        assert self._count(repo) == 0

    @pytest.mark.parametrize("fmt", ["qcow2", "vpc", "vhdx"])
    def test_zero_size_image_refused(self, repo: Path, tmp_path: Path, fmt: str) -> None:
        """qemu-img makes images of virtual size 0; they are refused, not half-stored."""
        img = tmp_path / f"empty.{fmt}"
        subprocess.run(["qemu-img", "create", "-q", "-f", fmt, str(img), "0"], check=True)
        p = repofs("ingest", repo, "--vm", "v", f"d={img}", check=False)
        assert_one_line_error(p, img.name, "virtual size is 0 bytes")
        assert self._count(repo) == 0

    def test_duplicate_disk_and_bad_spec(self, repo: Path, tmp_path: Path) -> None:
        """DISK=SOURCE must be well formed and disk names unique."""
        img = make_image(tmp_path / "d.img", MiB, [(0, b"x")])
        assert_one_line_error(
            repofs("ingest", repo, "--vm", "v", f"d={img}", f"d={img}", check=False),
            "more than once",
        )
        assert_one_line_error(
            repofs("ingest", repo, "--vm", "v", str(img), check=False), "NAME=VALUE"
        )
        assert_one_line_error(repofs("ingest", repo, "--vm", "v", check=False), "no disks")
        assert self._count(repo) == 0

    def test_a_quote_in_a_disk_name_is_refused(self, tmp_path: Path, repo: Path) -> None:
        """qemu cannot open a descriptor whose extent file name holds a quote."""
        img = make_image(tmp_path / "d.img", MiB, [(0, b"x")])
        p = repofs("ingest", repo, "--vm", "v", f'my"disk={img}', check=False)
        assert_one_line_error(p, "disk name", "must not contain")
        assert self._count(repo) == 0

    @pytest.mark.parametrize(
        "disks,configs,needle",
        [
            (["a-flat", "a"], [], "'a-flat.vmdk'"),
            (["a", "a-flat"], [], "'a-flat.vmdk'"),
            (["x"], ["x.vmdk"], "'x.vmdk'"),
            (["x"], ["x-flat.vmdk"], "'x-flat.vmdk'"),
            (["x"], ["one/web.vmx", "two/web.vmx"], "'web.vmx'"),
        ],
    )
    def test_names_that_would_hide_each_other_in_the_mount(
        self, repo: Path, tmp_path: Path, disks: list[str], configs: list[str], needle: str
    ) -> None:
        """Disk a-flat's descriptor and disk a's data would both be a-flat.vmdk: refused."""
        img = make_image(tmp_path / "d.img", MiB, [(0, b"x")])
        args = [f"{d}={img}" for d in disks]
        for c in configs:
            (tmp_path / c).parent.mkdir(exist_ok=True)
            (tmp_path / c).write_text("x\n")
            args += ["--config", str(tmp_path / c)]
        p = repofs("ingest", repo, "--vm", "v", *args, check=False)
        assert_one_line_error(p, needle, "would both be")
        assert p.returncode == 2
        assert self._count(repo) == 0

    def test_repository_path_problems(self, tmp_path: Path) -> None:
        """A missing repository, a file, or a plain directory are each named clearly."""
        f = tmp_path / "file"
        f.write_text("x")
        (tmp_path / "plain").mkdir()
        assert_one_line_error(repofs("list", tmp_path / "none", check=False), "no such repository")
        assert_one_line_error(repofs("stats", f, check=False), "not a directory")
        assert_one_line_error(
            repofs("list", tmp_path / "plain", check=False), "not a repofs repository"
        )

    def test_unknown_vm(self, repo: Path) -> None:
        """Listing a VM that has no restore points says so."""
        assert_one_line_error(repofs("list", repo, "ghost", check=False), "unknown VM")

    def test_unknown_parent(self, repo: Path, tmp_path: Path) -> None:
        """--parent must name an existing restore point of the VM."""
        img = make_image(tmp_path / "d.img", MiB, [(0, b"x")])
        ingest(repo, "v", f"d={img}")
        p = repofs(
            "ingest", repo, "--vm", "v", f"d={img}", "--parent", "2001-01-01T000000Z", check=False
        )
        assert_one_line_error(p, "no restore point")

    def test_click_usage_errors_are_one_line(self, repo: Path) -> None:
        """Even errors click finds itself (missing option, unknown command) are one line."""
        assert_one_line_error(repofs("ingest", repo, "d=x", check=False), "--vm")
        assert_one_line_error(repofs("frobnicate", check=False), "frobnicate")

    @pytest.mark.parametrize("kind", ["fifo", "dev-zero", "directory", "too-large"])
    def test_config_that_is_not_a_small_regular_file(
        self, repo: Path, tmp_path: Path, kind: str
    ) -> None:
        """A FIFO or /dev/zero as --config is refused at once, not waited on or read forever."""
        img = make_image(tmp_path / "d.img", MiB, [(0, b"x")])
        config, needle = not_a_small_regular_file(tmp_path / "c.vmx", kind, MAX_CONFIG_BYTES)
        p = repofs(
            "ingest", repo, "--vm", "v", f"d={img}", "--config", config, check=False, timeout=60
        )
        assert_one_line_error(p, str(config), "config file", needle)
        assert p.returncode == 2
        assert self._count(repo) == 0

    def test_missing_config_file(self, repo: Path, tmp_path: Path) -> None:
        """A --config that does not exist is refused before anything is written."""
        img = make_image(tmp_path / "d.img", MiB, [(0, b"x")])
        p = repofs(
            "ingest",
            repo,
            "--vm",
            "v",
            f"d={img}",
            "--config",
            str(tmp_path / "no.vmx"),
            check=False,
        )
        assert_one_line_error(p, "no.vmx")
        assert self._count(repo) == 0
