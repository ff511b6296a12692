"""Shared test helpers: running the real CLI, making images, real FUSE mounts."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]


def _loop_usable() -> bool:
    if os.geteuid() != 0 or shutil.which("losetup") is None:
        return False
    proc = subprocess.run(["losetup", "--find"], capture_output=True, text=True, check=False)
    return proc.returncode == 0 and proc.stdout.startswith("/dev/loop")


#: For tests that attach loop devices (as root): the trust tests and the corpus tools.
needs_loop = pytest.mark.skipif(not _loop_usable(), reason="needs root and loop devices")


def cli_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a CLI run: this tree's code, and no test hook left switched on."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO_ROOT)
    env.pop("REPOFS_TEST_PAUSE_BEFORE_COMMIT", None)
    env.pop("REPOFS_TEST_GC_DELAY", None)
    env.pop("REPOFS_REPOSITORY", None)  # a developer's own default must not leak into a test
    if extra:
        env.update(extra)
    return env


def cli_argv(*args: str | os.PathLike[str]) -> list[str]:
    return [sys.executable, "-m", "repofs", *map(str, args)]


def spawn(
    *args: str | os.PathLike[str], env: dict[str, str] | None = None
) -> subprocess.Popen[str]:
    """Start the CLI without waiting (for races and kills).

    SIGINT is reset to its default in the child: a suite started in the
    background by a non-interactive shell inherits it ignored, and the
    tests that press Ctrl-C would then wait for a command that never hears it.
    """
    return subprocess.Popen(
        cli_argv(*args),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=cli_env(env),
        stdin=subprocess.DEVNULL,
        preexec_fn=_default_sigint,
    )


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def repofs(
    *args: str | os.PathLike[str],
    check: bool = True,
    timeout: float = 600,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run the real ``repofs`` CLI in a subprocess, as an administrator would."""
    proc = subprocess.run(
        cli_argv(*args),
        capture_output=True,
        text=True,
        timeout=timeout,
        env=cli_env(env),
        stdin=subprocess.DEVNULL,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"repofs {' '.join(map(str, args))} failed ({proc.returncode}):\n"
            f"{proc.stdout}\n{proc.stderr}"
        )
    return proc


def ingest(
    repo: Path,
    vm: str,
    *disks: str,
    extra: tuple[str, ...] = (),
    env: dict[str, str] | None = None,
) -> str:
    """Ingest and return the new restore point id (the last line of stdout)."""
    out = repofs("ingest", repo, "--vm", vm, *disks, *extra, env=env).stdout
    return out.strip().splitlines()[-1]


def fs_type(path: Path) -> str:
    """The type of the file system ``path`` is on (ext4, tmpfs, ramfs...), as stat -f says it."""
    proc = subprocess.run(["stat", "-f", "-c", "%T", str(path)], capture_output=True, text=True)
    return proc.stdout.strip() or "unknown"


def skip_unless_o_direct(path: Path) -> None:
    """Skip a test of an ``O_DIRECT`` fast path where ``path``'s file system refuses O_DIRECT.

    ext4 and xfs take it, tmpfs only since Linux 6.6, ramfs and some FUSE and
    network file systems never; the fallback path has tests of its own.
    """
    probe = path / ".o_direct_probe"
    probe.write_bytes(bytes(4096))
    try:
        fd = os.open(probe, os.O_RDONLY | os.O_DIRECT)
    except OSError as exc:
        pytest.skip(f"{path} is on {fs_type(path)}, which refuses O_DIRECT ({exc.strerror})")
    else:
        os.close(fd)
    finally:
        probe.unlink()


def skip_unless_holes(path: Path) -> None:
    """Skip a test that counts the bytes a sparse image costs where ``path`` has no holes.

    A file system without ``SEEK_HOLE`` (ramfs, some FUSE and network ones)
    reports a sparse file as all data, so an ingest reads it all.
    """
    probe = path / ".holes_probe"
    with open(probe, "wb") as f:
        f.write(b"x" * 4096)
        f.truncate(4 << 20)
        hole = os.lseek(f.fileno(), 0, os.SEEK_HOLE)
    probe.unlink()
    if hole >= 4 << 20:
        pytest.skip(f"{path} is on {fs_type(path)}, which reports no holes in sparse files")


def assert_one_line_error(proc: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert proc.returncode != 0, proc.stdout
    lines = proc.stderr.strip().splitlines()
    errors = [ln for ln in lines if ln.startswith("repofs: error: ")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]


def disk_doc(name: str, capacity: int, **extra: object) -> dict[str, object]:
    """A restore point's document of one disk with an empty one-page map, for decoding tests."""
    return {
        "name": name,
        "capacity": capacity,
        "map_root": "00" * 32,
        "map_depth": 1,
        "n_chunks": 1,
        "allocated_bytes": 0,
        "source_format": "raw",
        "source_chain": [],
        **extra,
    }


def make_image(path: Path, size: int, writes: list[tuple[int, bytes]] | None = None) -> Path:
    """A sparse raw image of ``size`` bytes with ``writes`` placed at their offsets."""
    with open(path, "wb") as f:
        f.truncate(size)
        for offset, data in writes or []:
            f.seek(offset)
            f.write(data)
    return path


def not_a_small_regular_file(path: Path, kind: str, limit: int) -> tuple[Path, str]:
    """An input file that must be refused at once: ``kind`` is fifo, dev-zero, directory or
    too-large (sparse, one byte over ``limit``).  Returns its path and the error's words."""
    if kind == "fifo":
        os.mkfifo(path)
        return path, "not a regular file"
    if kind == "dev-zero":
        return Path("/dev/zero"), "not a regular file"
    if kind == "directory":
        path.mkdir()
        return path, "is a directory"
    make_image(path, limit + 1)
    return path, f"at most {limit}"


def qemu_compare(a: Path | str, b: Path | str) -> None:
    proc = subprocess.run(
        ["qemu-img", "compare", "-f", "raw", str(a), str(b)], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "identical" in proc.stdout


def _daemon_pids(mountpoint: Path) -> list[int]:
    pids = []
    target = str(mountpoint)
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if b"repofs" in b" ".join(argv) and b"mount" in argv and target.encode() in argv:
            pids.append(int(entry))
    return pids


def is_mounted(mountpoint: Path) -> bool:
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == str(mountpoint) for line in f)


def unmount(mountpoint: Path) -> None:
    """Always leaves the mount point unmounted: -u, then -z, then kill the daemon."""
    for args in (["-u"], ["-uz"]):
        if not is_mounted(mountpoint):
            break
        subprocess.run(["fusermount3", *args, str(mountpoint)], capture_output=True)
        for _ in range(50):
            if not is_mounted(mountpoint):
                break
            time.sleep(0.1)
    deadline = time.monotonic() + 10
    while (pids := _daemon_pids(mountpoint)) and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid in _daemon_pids(mountpoint):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    del pids


@contextlib.contextmanager
def mounted(repo: Path, mountpoint: Path, *extra: str) -> Iterator[Path]:
    """A real FUSE mount through the real CLI, always unmounted afterwards."""
    mountpoint.mkdir(exist_ok=True)
    log = mountpoint.parent / f"{mountpoint.name}.log"
    try:
        repofs("mount", repo, mountpoint, "--log", log, *extra, timeout=60)
        assert is_mounted(mountpoint), "mount returned but nothing is mounted"
        yield mountpoint
    finally:
        unmount(mountpoint)
        if log.exists() and "Traceback" in log.read_text():
            raise AssertionError(f"daemon log has a traceback:\n{log.read_text()}")
