"""Encryption at rest: keys, every command on an encrypted repository, tampering, no clear names."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import blake3
import pytest

from repofs.store.records import RECORD_HEADER_SIZE, RecordType
from tests.support.helpers import (
    assert_one_line_error,
    cli_argv,
    cli_env,
    ingest,
    make_image,
    mounted,
    qemu_compare,
    repofs,
)
from tests.support.maint import chunk_record, flip_byte, pack_files

KiB, MiB = 1 << 10, 1 << 20
PASS = os.environ["REPOFS_PASSPHRASE"]  # set by conftest for every test
# Names that appear nowhere by chance: grepping a repository for them finds a leak or nothing.
VM = "payroll-db-7f3a9c"
DISK = "sysdisk-q9w2x7"
CONFIG = "payroll-vmx-k4t8p1.vmx"
CONFIG_TEXT = b'displayName = "payroll database"\nmemsize = "8192"\n' * 20
TEXT = b"Quarterly salaries of every employee, strictly confidential. " * 2200


def run_without(names: tuple[str, ...], *args: str | Path, extra: dict[str, str] | None = None):
    """The CLI with ``names`` removed from its environment (no passphrase source at all)."""
    env = cli_env(extra)
    for name in names:
        env.pop(name, None)
    return subprocess.run(
        cli_argv(*args), capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL
    )


def on_terminal(args: tuple[str | Path, ...], typed: str) -> tuple[int, str]:
    """The CLI on a pseudo-terminal of its own (its controlling terminal), with ``typed`` input."""
    import fcntl
    import pty
    import termios
    import time

    env = cli_env()
    env.pop("REPOFS_PASSPHRASE", None)
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        cli_argv(*args),
        stdin=slave,
        stdout=slave,
        stderr=slave,
        env=env,
        start_new_session=True,
        preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0),
    )
    os.close(slave)
    out = b""
    for line in typed.splitlines(keepends=True):
        deadline = time.monotonic() + 30
        while b"passphrase" not in out.split(b"\n")[-1] and time.monotonic() < deadline:
            out += os.read(master, 4096)
        os.write(master, line.encode())
        out += b"\n"  # the next prompt is on a line of its own
    code = proc.wait(60)
    try:
        while chunk := os.read(master, 4096):
            out += chunk
    except OSError:  # EIO: the terminal's other end is closed
        pass
    os.close(master)
    return code, out.decode(errors="replace")


def snapshot(path: Path) -> dict[str, tuple[int, str]]:
    """Every file under ``path`` with its size and content hash: what 'nothing touched' means."""
    out = {}
    for p in sorted(path.rglob("*")):
        if p.is_file() and p.name != "lock.mdb":
            out[str(p.relative_to(path))] = (
                p.stat().st_size,
                hashlib.sha256(p.read_bytes()).hexdigest(),
            )
    return out


def source_image(tmp_path: Path, name: str = "srcimg-m3n8.raw") -> Path:
    """4 MiB + 512: compressible text, random data, a hole and a short last chunk."""
    return make_image(
        tmp_path / name,
        4 * MiB + 512,
        [(0, TEXT[: 2 * MiB]), (2 * MiB + 4096, os.urandom(MiB)), (4 * MiB, os.urandom(512))],
    )


def config_of(repo: Path) -> dict:
    return json.loads((repo / "config.json").read_text())


class TestInit:
    def test_default_is_encrypted_with_aes_gcm_as_version_3(self, tmp_path: Path) -> None:
        """A plain init seals with AES-256-GCM and writes version 3 with the key in REPO/key."""
        out = repofs("init", tmp_path / "r").stdout
        assert "aes-256-gcm" in out
        cfg = config_of(tmp_path / "r")
        assert cfg["version"] == 3
        assert cfg["encryption"]["cipher"] == "aes-256-gcm"
        assert cfg["encryption"]["key"] == "passphrase"
        key = json.loads((tmp_path / "r" / "key").read_text())
        assert key["kdf"]["name"] == "argon2id" and "wrapped" in key
        assert (tmp_path / "r" / "key").stat().st_mode & 0o777 == 0o600
        info = json.loads(repofs("info", tmp_path / "r", "--json").stdout)
        assert info["encryption"] == "aes-256-gcm" and info["key"] == "passphrase"

    def test_chacha20_poly1305(self, tmp_path: Path) -> None:
        """--encryption chacha20-poly1305 is recorded and reads back what was ingested."""
        repofs("init", tmp_path / "r", "--encryption", "chacha20-poly1305")
        assert config_of(tmp_path / "r")["encryption"]["cipher"] == "chacha20-poly1305"
        img = source_image(tmp_path)
        ingest(tmp_path / "r", VM, f"{DISK}={img}")
        assert "no problems found" in repofs("verify", tmp_path / "r").stdout

    def test_no_passphrase_source_and_no_terminal_is_refused(self, tmp_path: Path) -> None:
        """Without REPOFS_PASSPHRASE, a passphrase file, a key file or a terminal: one line."""
        proc = run_without(("REPOFS_PASSPHRASE",), "init", tmp_path / "r")
        assert_one_line_error(
            proc, "REPOFS_PASSPHRASE", "--passphrase-file", "--key-file", "--encryption none"
        )
        assert proc.returncode == 2
        assert not (tmp_path / "r").exists()

    def test_prompt_on_a_terminal(self, tmp_path: Path) -> None:
        """With no other source, init asks twice on the terminal; list then asks once."""
        repo = tmp_path / "r"
        proc_init = on_terminal(("init", repo), "typed at the prompt\ntyped at the prompt\n")
        assert proc_init[0] == 0, proc_init[1]
        assert proc_init[1].count("passphrase") >= 2
        code, out = on_terminal(("list", repo), "typed at the prompt\n")
        assert code == 0, out
        code, out = on_terminal(("list", repo), "wrong\n")
        assert code == 2 and "wrong passphrase" in out

    def test_passphrase_file(self, tmp_path: Path) -> None:
        """--passphrase-file works for init and later commands, without the variable."""
        pf = tmp_path / "pass"
        pf.write_text("file passphrase\n")
        repo = tmp_path / "r"
        ok = run_without(("REPOFS_PASSPHRASE",), "init", repo, "--passphrase-file", pf)
        assert ok.returncode == 0, ok.stderr
        ok = run_without(("REPOFS_PASSPHRASE",), "list", repo, "--passphrase-file", pf)
        assert ok.returncode == 0, ok.stderr
        assert_one_line_error(repofs("list", repo, check=False), "wrong passphrase")

    def test_wrong_passphrase_is_one_line_and_touches_nothing(self, tmp_path: Path) -> None:
        """Every command given a wrong passphrase says so in one line and changes no file."""
        repo = tmp_path / "r"
        repofs("init", repo)
        img = source_image(tmp_path)
        rp = ingest(repo, VM, f"{DISK}={img}")
        before = snapshot(repo)
        wrong = {"REPOFS_PASSPHRASE": "not the passphrase"}
        mnt = tmp_path / "mnt"
        mnt.mkdir()
        for args in (
            ("list", repo),
            ("ingest", repo, "--vm", VM, f"{DISK}={img}"),
            ("verify", repo),
            ("gc", repo),
            ("prune", repo, "--keep-last", "1"),
            ("delete", repo, VM, rp),
            ("rebuild-index", repo),
            ("mount", repo, mnt),
            ("info", repo),
            ("key", "change-passphrase", repo),
        ):
            proc = repofs(*args, check=False, env=wrong)
            assert_one_line_error(proc, "wrong passphrase")
        assert snapshot(repo) == before
        assert not os.path.ismount(mnt)

    def test_key_file_mode(self, tmp_path: Path) -> None:
        """--key-file: the key lives only in that file; without it, or with another, one line."""
        repo, key = tmp_path / "r", tmp_path / "repo.key"
        ok = run_without(("REPOFS_PASSPHRASE",), "init", repo, "--key-file", key)
        assert ok.returncode == 0, ok.stderr
        assert not (repo / "key").exists()
        assert key.stat().st_mode & 0o777 == 0o600
        assert config_of(repo)["encryption"]["key"] == "key-file"
        img = source_image(tmp_path)
        env = {"REPOFS_KEY_FILE": str(key)}
        ingest(repo, VM, f"{DISK}={img}", env=env)
        assert VM in repofs("list", repo, env=env).stdout
        assert VM in run_without(("REPOFS_PASSPHRASE",), "list", repo, "--key-file", key).stdout
        assert_one_line_error(run_without(("REPOFS_PASSPHRASE",), "list", repo), "--key-file")
        other, other_key = tmp_path / "o", tmp_path / "other.key"
        repofs("init", other, "--key-file", other_key)
        assert_one_line_error(
            repofs("list", repo, "--key-file", other_key, check=False), "another repository"
        )
        # The same repository's config with a forged key file of the right id but wrong key.
        forged = json.loads(key.read_text())
        forged["master"] = os.urandom(32).hex()
        (tmp_path / "forged.key").write_text(json.dumps(forged))
        assert_one_line_error(
            repofs("list", repo, "--key-file", tmp_path / "forged.key", check=False),
            "not this repository's key file",
        )

    def test_key_file_inside_the_repository_or_existing_is_refused(self, tmp_path: Path) -> None:
        """A key file inside the repository would defeat the encryption; an existing one is kept."""
        repo = tmp_path / "r"
        repo.mkdir()
        proc = repofs("init", repo, "--key-file", repo / "k", check=False)
        assert_one_line_error(proc, "outside the repository")
        existing = tmp_path / "existing.key"
        existing.write_text("mine")
        proc = repofs("init", tmp_path / "r2", "--key-file", existing, check=False)
        assert_one_line_error(proc, "exists")
        assert existing.read_text() == "mine"

    def test_encryption_none_is_the_unencrypted_format_2(self, tmp_path: Path) -> None:
        """--encryption none: version 2 as before, no key, chunk names are plain BLAKE3."""
        repo = tmp_path / "r"
        out = run_without(("REPOFS_PASSPHRASE",), "init", repo, "--encryption", "none")
        assert out.returncode == 0 and "not encrypted" in out.stdout
        cfg = config_of(repo)
        assert cfg["version"] == 2 and "encryption" not in cfg
        assert not (repo / "key").exists()
        img = source_image(tmp_path)
        rp = run_without(("REPOFS_PASSPHRASE",), "ingest", repo, "--vm", VM, f"{DISK}={img}")
        assert rp.returncode == 0, rp.stderr
        pack = b"".join(p.read_bytes() for p in pack_files(repo))
        assert blake3.blake3(TEXT[: 128 * KiB]).digest() in pack

    def test_older_repofs_refuses_version_3(self, tmp_path: Path) -> None:
        """This repofs reads up to version 3 and refuses a newer one, naming it."""
        from repofs.store import config as cfgmod

        repo = tmp_path / "r"
        repofs("init", repo)
        assert cfgmod.READABLE_VERSIONS[-1] == 3
        doc = config_of(repo)
        doc["version"] = 4
        (repo / "config.json").write_text(json.dumps(doc))
        assert_one_line_error(repofs("list", repo, check=False), "version 4", "newer repofs")


class TestKeyCommands:
    def test_export_change_passphrase_import_round_trip(self, tmp_path: Path) -> None:
        """After change-passphrase the old one is refused; a lost REPO/key comes back by import."""
        repo = tmp_path / "r"
        repofs("init", repo)
        img = source_image(tmp_path)
        ingest(repo, VM, f"{DISK}={img}")
        exported = tmp_path / "exported.key"
        repofs("key", "export", repo, exported)
        assert exported.read_bytes() == (repo / "key").read_bytes()
        assert_one_line_error(repofs("key", "export", repo, exported, check=False), "exists")
        repofs("key", "change-passphrase", repo, env={"REPOFS_NEW_PASSPHRASE": "new one"})
        assert_one_line_error(repofs("list", repo, check=False), "wrong passphrase")
        assert VM in repofs("list", repo, env={"REPOFS_PASSPHRASE": "new one"}).stdout
        (repo / "key").unlink()
        assert_one_line_error(repofs("list", repo, check=False), "key import")
        # The copy exported before the change still needs the old passphrase.
        proc = repofs(
            "key", "import", repo, exported, check=False, env={"REPOFS_PASSPHRASE": "new one"}
        )
        assert_one_line_error(proc, "wrong passphrase")
        repofs("key", "import", repo, exported)
        assert VM in repofs("list", repo).stdout
        assert "no problems found" in repofs("verify", repo).stdout

    def test_import_of_another_repositorys_key_is_refused(self, tmp_path: Path) -> None:
        """A key of another repository is named as such and REPO/key stays as it was."""
        a, b = tmp_path / "a", tmp_path / "b"
        repofs("init", a)
        repofs("init", b)
        before = (a / "key").read_bytes()
        assert_one_line_error(
            repofs("key", "import", a, b / "key", check=False), "another repository"
        )
        assert (a / "key").read_bytes() == before

    def test_key_commands_on_an_unencrypted_repository(self, tmp_path: Path) -> None:
        """An unencrypted repository has no key to export: one line."""
        repofs("init", tmp_path / "r", "--encryption", "none")
        proc = repofs("key", "export", tmp_path / "r", tmp_path / "k", check=False)
        assert_one_line_error(proc, "not encrypted")


@pytest.fixture
def scenario(tmp_path: Path) -> tuple[Path, Path, list[str]]:
    """An encrypted repository with a full and a CBT incremental restore point of one VM."""
    repo = tmp_path / "repo"
    repofs("init", repo)
    img = source_image(tmp_path)
    cfg = tmp_path / CONFIG
    cfg.write_bytes(CONFIG_TEXT)
    day0 = tmp_path / "day0.raw"
    first = ingest(repo, VM, f"{DISK}={img}", extra=("--config", str(cfg)))
    shutil.copy(img, day0)
    with open(img, "r+b") as f:
        f.seek(MiB + 100)
        f.write(os.urandom(5000))
    cbt = tmp_path / "cbt.json"
    cbt.write_text(json.dumps({"block_size": 512, "extents": [[MiB, 5632]]}))
    second = ingest(repo, VM, f"{DISK}={img}", extra=("--changed-blocks", f"{DISK}={cbt}"))
    return repo, tmp_path, [first, second]


class TestCommands:
    def test_every_command_on_an_encrypted_repository(self, scenario) -> None:
        """Ingest, list, stats, info, mount, verify, protect, prune, delete, gc, rebuild-index."""
        repo, tmp, (first, second) = scenario
        listing = json.loads(repofs("list", repo, "--json").stdout)
        assert [r["id"] for r in listing] == [first, second]
        assert json.loads(repofs("stats", repo, "--json").stdout)["restore_points"] == 2
        mnt = tmp / "mnt"
        with mounted(repo, mnt):
            qemu_compare(mnt / VM / first / f"{DISK}-flat.vmdk", tmp / "day0.raw")
            qemu_compare(mnt / VM / second / f"{DISK}-flat.vmdk", tmp / "srcimg-m3n8.raw")
            assert (mnt / VM / first / CONFIG).read_bytes() == CONFIG_TEXT
            inodes = {p: os.stat(mnt / VM / p).st_ino for p in (first, second)}
        assert "no problems found" in repofs("verify", repo).stdout
        repofs("protect", repo, VM, first)
        shutil.rmtree(repo / "index")
        out = repofs("rebuild-index", repo).stdout
        assert "2 restore point" in out or "restore points: 2" in out or out
        listing = json.loads(repofs("list", repo, "--json").stdout)
        assert [(r["id"], r["protected"]) for r in listing] == [(first, True), (second, False)]
        with mounted(repo, mnt):
            qemu_compare(mnt / VM / second / f"{DISK}-flat.vmdk", tmp / "srcimg-m3n8.raw")
            assert {p: os.stat(mnt / VM / p).st_ino for p in (first, second)} == inodes
        repofs("prune", repo, "--keep-last", "1")  # the protected one stays
        assert len(json.loads(repofs("list", repo, "--json").stdout)) == 2
        repofs("unprotect", repo, VM, first)
        repofs("delete", repo, VM, first)
        gc = json.loads(repofs("gc", repo, "--threshold", "100", "--json").stdout)
        assert gc["packs_rewritten"] >= 1  # sealed records copied verbatim into new packs
        assert "no problems found" in repofs("verify", repo).stdout
        with mounted(repo, mnt):
            qemu_compare(mnt / VM / second / f"{DISK}-flat.vmdk", tmp / "srcimg-m3n8.raw")
        shutil.rmtree(repo / "index")  # verify without an index still reads the sealed records
        proc = repofs("verify", repo, check=False)
        assert f"{VM}/{second}" in proc.stdout + proc.stderr, proc.stdout + proc.stderr
        repofs("rebuild-index", repo)
        assert [r["id"] for r in json.loads(repofs("list", repo, "--json").stdout)] == [second]
        assert_no_clear_names(repo, [VM, DISK, CONFIG, "srcimg-m3n8", "day0"])

    def test_no_clear_names_or_content_anywhere_in_the_repository(self, scenario) -> None:
        """grep -r and strings find no VM, disk, config or source name, content or plain digest."""
        repo, _tmp, _ids = scenario
        assert_no_clear_names(repo, [VM, DISK, CONFIG, "srcimg-m3n8"])
        grep = subprocess.run(
            [
                "grep",
                "-r",
                "-a",
                "-l",
                "-e",
                VM,
                "-e",
                DISK,
                "-e",
                CONFIG,
                "-e",
                "Quarterly",
                str(repo),
            ],
            capture_output=True,
        )
        assert grep.returncode == 1, grep.stdout


class TestIndexPages:
    def test_lmdb_pages_hold_no_stale_heap_bytes(self, tmp_path: Path) -> None:
        """data.mdb holds no leftovers of the process's memory (LMDB's meminit is on)."""
        repo = tmp_path / "r"
        repofs("init", repo)
        img = tmp_path / "leak.img"
        line = f"a line of text naming {VM} in a guest log\n".encode()
        img.write_bytes(os.urandom(3 * MiB) + line * (2 * MiB // len(line)))
        ingest(repo, VM, f"{DISK}={img}")
        data = (repo / "index" / "data.mdb").read_bytes()
        assert VM.encode() not in data and b"a line of text" not in data


def assert_no_clear_names(repo: Path, names: list[str]) -> None:
    """Nothing in the repository holds a name, known content or a known chunk's plain digest."""
    needles = [n.encode() for n in names] + [b"Quarterly salaries", b"displayName"]
    digest = blake3.blake3(TEXT[: 128 * KiB]).digest()
    needles += [digest, digest.hex().encode(), blake3.blake3(CONFIG_TEXT).digest()]
    for path in sorted(repo.rglob("*")):
        if not path.is_file():
            continue
        data = path.read_bytes()
        for needle in needles:
            assert needle not in data, f"{needle!r} in {path}"
        strings = subprocess.run(["strings", "-a", str(path)], capture_output=True).stdout
        for name in names:
            assert name.encode() not in strings, f"{name} in strings of {path}"


class TestTamper:
    def _mount_read(self, repo: Path, mnt: Path, rp: str) -> bytes | OSError:
        with mounted(repo, mnt):
            try:
                return (mnt / VM / rp / f"{DISK}-flat.vmdk").read_bytes()
            except OSError as exc:
                return exc

    def test_flipped_byte_in_a_chunk_is_eio_and_named_by_verify(self, scenario) -> None:
        """A flipped ciphertext byte fails the tag: EIO in the mount; verify names the record."""
        repo, tmp, (first, _second) = scenario
        pack, offset, stored = chunk_record(repo, VM, first, 0, DISK)
        flip_byte(pack, offset + RECORD_HEADER_SIZE + stored // 2)
        got = self._mount_read(repo, tmp / "mnt", first)
        assert isinstance(got, OSError) and got.errno == 5
        proc = repofs("verify", repo, check=False)
        assert proc.returncode == 5
        assert f"offset {offset}" in proc.stdout + proc.stderr
        assert "authenticate" in proc.stdout + proc.stderr

    def test_swapped_payloads_of_equal_size_are_eio(self, scenario) -> None:
        """Two sealed chunks of equal size swapped in place: each fails under the other's name."""
        repo, tmp, (first, _second) = scenario
        a = chunk_record(repo, VM, first, 2 * MiB + 128 * KiB, DISK)  # random: stored raw
        b = chunk_record(repo, VM, first, 2 * MiB + 256 * KiB, DISK)
        assert a[0] == b[0] and a[2] == b[2] and a[1] != b[1]
        data = bytearray(a[0].read_bytes())
        pa, pb = a[1] + RECORD_HEADER_SIZE, b[1] + RECORD_HEADER_SIZE
        data[pa : pa + a[2]], data[pb : pb + b[2]] = data[pb : pb + b[2]], data[pa : pa + a[2]]
        a[0].write_bytes(bytes(data))
        got = self._mount_read(repo, tmp / "mnt", first)
        assert isinstance(got, OSError) and got.errno == 5
        assert repofs("verify", repo, check=False).returncode == 5

    def test_flipped_byte_in_a_map_page_or_restore_point_record(self, scenario) -> None:
        """A damaged page is EIO through the mount; a damaged record is named by verify."""
        from repofs.store.repository import Repository

        repo, tmp, (first, _second) = scenario
        with Repository.open(str(repo)) as r:
            rp = r.resolve(VM, first)
            page = r.index.locate(RecordType.PAGE, rp.disks[0].map.root)
            from repofs.store.rprecords import rp_record_digest

            record = r.index.locate(RecordType.RESTORE_POINT, rp_record_digest(rp.to_doc(), r.keys))
            assert page is not None and record is not None
            page_pack = Path(r.packs.path_of(page.pack_id))
            record_pack = Path(r.packs.path_of(record.pack_id))
        flip_byte(page_pack, page.offset + RECORD_HEADER_SIZE + 20)
        flip_byte(record_pack, record.offset + RECORD_HEADER_SIZE + record.stored_len - 3)
        got = self._mount_read(repo, tmp / "mnt", first)
        assert isinstance(got, OSError) and got.errno == 5
        proc = repofs("verify", repo, check=False)
        assert proc.returncode == 5
        out = proc.stdout + proc.stderr
        assert f"offset {page.offset}" in out and f"offset {record.offset}" in out


class TestPlainRepositories:
    def test_an_unencrypted_repository_needs_no_key(self, tmp_path: Path) -> None:
        """A version-2 repository opens, ingests, mounts and verifies with no passphrase at all."""
        repo = tmp_path / "r"
        none = ("REPOFS_PASSPHRASE",)
        assert run_without(none, "init", repo, "--encryption", "none").returncode == 0
        img = source_image(tmp_path)
        assert run_without(none, "ingest", repo, "--vm", VM, f"{DISK}={img}").returncode == 0
        proc = run_without(none, "verify", repo)
        assert proc.returncode == 0 and "no problems found" in proc.stdout
        assert config_of(repo)["version"] == 2


def test_cryptography_is_new_enough() -> None:
    """Argon2id came to cryptography in 44: the dependency says so."""
    import cryptography

    assert int(cryptography.__version__.split(".")[0]) >= 44
    text = (Path(__file__).resolve().parent.parent.parent / "pyproject.toml").read_text()
    assert '"cryptography>=44"' in text
    assert sys.version_info >= (3, 11)
