"""Power-loss testing: run a command, cut the power at a durability point, see what survives.

A kill -9 loses nothing the kernel already has, so it cannot find a missing
``fsync``.  Here an ``LD_PRELOAD`` library (``powerloss_preload.c``, built
with gcc into the test's directory) counts every durability point of the
command (``fsync``, ``fdatasync``, ``sync``, ``syncfs``, each write through
an ``O_SYNC``/``O_DSYNC`` descriptor) under a root directory, records what
each one made durable, and kills the command with SIGKILL at point N, before
that point takes effect.  :func:`after_power_loss` then builds the tree a
power cut at that moment leaves, in the strict POSIX model (the method of
LazyFS, ALICE and CrashMonkey):

* what the root held before the command is durable (the test set it up);
* a directory holds the entries it had at its last ``fsync``, or before the
  command, or none if it is new: a new entry (a created file, a rename, a
  ``mkdir``) survives only once its parent directory is fsynced;
* a file holds its content at its last ``fsync``/``fdatasync``, patched by
  later ``O_DSYNC`` writes; a file never synced keeps its old content, or is
  empty if it is new.

ext4 in its default ``data=ordered`` mode is kinder (an ``fsync`` of a new
file commits its directory entry too, renames are ordered), but XFS, btrfs
and others are not, and neither is every ext4 mount option: the model
promises nothing beyond POSIX.

Inodes are keyed by number: a number freed and reused by the same command
would mix two files (not seen in repofs's commands, which sync every unlink).
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.support.helpers import REPO_ROOT, cli_argv, cli_env

SOURCE = Path(__file__).with_name("powerloss_preload.c")


def build_library(dest: Path) -> Path:
    """Compile the preload library into ``dest``; returns the path of the ``.so``."""
    lib = dest / "libpowerloss.so"
    if not lib.exists():
        dest.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            ["gcc", "-shared", "-fPIC", "-O2", "-Wall", "-o", str(lib), str(SOURCE), "-ldl"],
            check=True,
            capture_output=True,
        )
    return lib


@dataclass
class Snapshot:
    """A tree as it was before the command: directory entries and file contents, by inode."""

    root_ino: int
    dirs: dict[int, dict[str, tuple[int, str]]] = field(default_factory=dict)
    files: dict[int, bytes] = field(default_factory=dict)


def snapshot(root: Path) -> Snapshot:
    snap = Snapshot(os.lstat(root).st_ino)
    for dirpath, dirnames, filenames in os.walk(root):
        entries: dict[str, tuple[int, str]] = {}
        for name in dirnames + filenames:
            st = os.lstat(os.path.join(dirpath, name))
            kind = "d" if stat.S_ISDIR(st.st_mode) else "f" if stat.S_ISREG(st.st_mode) else "o"
            entries[name] = (st.st_ino, kind)
            if kind == "f":
                snap.files[st.st_ino] = Path(dirpath, name).read_bytes()
        snap.dirs[os.lstat(dirpath).st_ino] = entries
    return snap


@dataclass
class Run:
    """One run of a command under the library."""

    returncode: int
    points: int  #: durability points it reached (the one it was killed at included)
    killed: bool
    log: Path
    stdout: str
    stderr: str


def run(
    argv: Sequence[str | os.PathLike[str]],
    root: Path,
    log: Path,
    lib: Path,
    kill_at: int = 0,
    timeout: float = 300,
    cwd: Path = REPO_ROOT,
) -> Run:
    """Run the command line ``argv``, recording durability under ``root``; cut at ``kill_at``."""
    if log.exists():
        shutil.rmtree(log)
    log.mkdir(parents=True)
    env = cli_env(
        {
            "LD_PRELOAD": str(lib),
            "PL_ROOT": os.path.realpath(root),
            "PL_LOG": str(log),
            "PL_KILL_AT": str(kill_at),
        }
    )
    proc = subprocess.run(
        [str(a) for a in argv],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        cwd=cwd,
    )
    counts = [int(p.read_text() or 0) for p in log.glob("count.*")]
    return Run(
        proc.returncode,
        max(counts, default=0),
        proc.returncode == -9,
        log,
        proc.stdout,
        proc.stderr,
    )


def after_power_loss(before: Snapshot, log: Path, dest: Path) -> None:
    """Build at ``dest`` the tree that the power cut at the end of ``log`` leaves."""
    dirs = dict(before.dirs)
    files = dict(before.files)
    events = log / "events"
    lines = events.read_text().splitlines() if events.exists() else []
    for line in lines:
        kind, pid, seq, part, _dev, ino_s, off_s, _path = line.split(" ", 7)
        data = (log / f"{pid}.{seq}.{part}").read_bytes()
        ino = int(ino_s)
        if kind == "F":
            files[ino] = data
        elif kind == "D":
            entries = {}
            for entry in data.decode().splitlines():
                child, ckind, name = entry.split(" ", 2)
                entries[name] = (int(child), ckind)
            dirs[ino] = entries
        elif kind == "R":
            off = int(off_s)
            old = files.get(ino, b"")
            if len(old) < off:
                old += bytes(off - len(old))
            files[ino] = old[:off] + data + old[off + len(data) :]
    _build(before.root_ino, dest, dirs, files, set())


def _build(
    ino: int,
    dest: Path,
    dirs: dict[int, dict[str, tuple[int, str]]],
    files: dict[int, bytes],
    seen: set[int],
) -> None:
    dest.mkdir(mode=0o700)
    if ino in seen:  # a directory reachable twice (a rename mid-way): once is enough
        return
    seen.add(ino)
    for name, (child, kind) in sorted(dirs.get(ino, {}).items()):
        if kind == "d":
            _build(child, dest / name, dirs, files, seen)
        elif kind == "f":
            (dest / name).write_bytes(files.get(child, b""))
            os.chmod(dest / name, 0o600)


# -- campaigns ---------------------------------------------------------------------------


@dataclass
class Scenario:
    """A command to cut, on a repository ``prepare`` sets up under ``base``.

    ``check(base)`` inspects the tree a cut left, raises ``AssertionError``
    for a broken promise, and returns whether what the command commits is
    there (None where both outcomes look the same): that must stay true at
    every later cut and be true after the uncut run.
    """

    name: str
    prepare: Callable[[Path], None]
    argv: Callable[[Path], list[str]]
    check: Callable[[Path], object]


@dataclass
class CutResult:
    cut: int
    killed: bool
    state: object
    error: str | None = None


@dataclass
class Campaign:
    scenario: Scenario
    points: int
    results: list[CutResult] = field(default_factory=list)

    @property
    def failures(self) -> list[CutResult]:
        return [r for r in self.results if r.error is not None]


def cut_points(points: int, sample: int | None) -> list[int]:
    """Every point, then the uncut run (points + 1); or ``sample`` of them spread out.

    A sample always holds the first and the last point and the uncut run.
    """
    every = list(range(1, points + 2))
    if sample is None or sample >= len(every):
        return every
    step = (len(every) - 1) / max(1, sample - 1)
    return sorted({every[round(k * step)] for k in range(sample)} | {1, points, points + 1})


def run_campaign(
    scenario: Scenario,
    workdir: Path,
    *,
    sample: int | None = None,
    on_cut: Callable[[CutResult], None] | None = None,
) -> Campaign:
    """Count the scenario's durability points, then cut at each chosen one and check the tree.

    Visibility of what the command commits must be monotonic: once a cut
    shows it, every later cut shows it too, and the uncut run always does.
    """
    lib = build_library(workdir / "lib")
    pristine = workdir / "pristine"
    scenario.prepare(pristine)
    counted = _one_run(scenario, pristine, workdir, lib, 0)
    if counted.returncode != 0:
        raise AssertionError(
            f"{scenario.name}: the uncut run failed ({counted.returncode}):\n{counted.stderr}"
        )
    campaign = Campaign(scenario, counted.points)
    for cut in cut_points(counted.points, sample):
        result = _cut(scenario, pristine, workdir, lib, cut, cut > counted.points)
        campaign.results.append(result)
        if on_cut is not None:
            on_cut(result)
    _check_monotonic(campaign)
    return campaign


def _fresh(pristine: Path, workdir: Path) -> Path:
    """A copy of the prepared tree to run the command on."""
    base = workdir / "base"
    if base.exists():
        shutil.rmtree(base)
    shutil.copytree(pristine, base, symlinks=True)
    return base


def _one_run(scenario: Scenario, pristine: Path, workdir: Path, lib: Path, cut: int) -> Run:
    base = _fresh(pristine, workdir)
    return run(cli_argv(*scenario.argv(base)), base, workdir / "log", lib, kill_at=cut)


def _cut(
    scenario: Scenario, pristine: Path, workdir: Path, lib: Path, cut: int, final: bool
) -> CutResult:
    base = _fresh(pristine, workdir)
    before = snapshot(base)
    done = run(
        cli_argv(*scenario.argv(base)), base, workdir / "log", lib, kill_at=0 if final else cut
    )
    after = workdir / "after"
    if after.exists():
        shutil.rmtree(after)
    after_power_loss(before, done.log, after)
    result = CutResult(cut, done.killed, None)
    if not done.killed and done.returncode != 0:
        result.error = f"the command failed ({done.returncode}):\n{done.stderr}"
        return result
    try:
        result.state = scenario.check(after)
    except AssertionError as exc:
        result.error = str(exc) or repr(exc)
    except Exception as exc:  # a check that crashes is a finding too, not a harness failure
        result.error = f"{type(exc).__name__}: {exc}"
    return result


def _check_monotonic(campaign: Campaign) -> None:
    """What a command commits stays once a cut shows it, and the uncut run must show it."""
    committed_at = None
    for r in campaign.results:
        if r.error is not None or r.state is None:
            continue
        if r.state:
            committed_at = committed_at or r.cut
        elif committed_at is not None:
            r.error = f"committed at cut {committed_at}, gone again at cut {r.cut}"
        elif not r.killed:
            r.error = "the command finished, but a power loss then takes back what it committed"


def summary(campaign: Campaign) -> str:
    """One line for the campaign, then one per failing cut."""
    bad = campaign.failures
    lines = [
        f"{campaign.scenario.name}: {campaign.points} durability points, "
        f"{len(campaign.results)} cuts, {len(bad)} failed"
    ]
    for r in bad:
        first = r.error.splitlines()[0] if r.error else ""
        lines.append(f"  cut {r.cut}: {first}")
    return "\n".join(lines)


# -- repofs's scenarios ----------------------------------------------------------------

CHUNK = 64 * 1024
IMAGE_BYTES = 3 * 1024 * 1024
VM = "vm"


def _noise(n: int, seed: int) -> bytes:
    import random

    return random.Random(seed).randbytes(n)


def _images(base: Path) -> tuple[Path, Path, Path]:
    """Image A, image B (A with nine tenths rewritten) and C (A with a few blocks changed)."""
    images = base.parent / "images"
    images.mkdir(exist_ok=True)
    a = _noise(IMAGE_BYTES, 1)
    b = a[: IMAGE_BYTES // 10] + _noise(IMAGE_BYTES - IMAGE_BYTES // 10, 2)
    c = bytearray(a)
    for k in (3, 17, 30):
        c[k * CHUNK : (k + 1) * CHUNK] = _noise(CHUNK, 100 + k)
    for name, data in (("a.img", a), ("b.img", b), ("c.img", bytes(c))):
        (images / name).write_bytes(data)
    (images / "c.json").write_text(
        json.dumps({"block_size": CHUNK, "extents": [[k * CHUNK, CHUNK] for k in (3, 17, 30)]})
    )
    return images / "a.img", images / "b.img", images / "c.img"


def _new_repo(base: Path) -> Path:
    """A repository whose packs hold 1 MiB, so a few megabytes make several packs."""
    from tests.support.maint import new_repo

    base.mkdir(parents=True, exist_ok=True)
    repo = new_repo(base / "repo", CHUNK)
    config = json.loads((repo / "config.json").read_text())
    config["pack_target_size"] = 1024 * 1024
    (repo / "config.json").write_text(json.dumps(config))
    return repo


def _image(base: Path, name: str) -> bytes:
    return (base.parent / "images" / name).read_bytes()


def _restore_points(repo: Path) -> dict[str, bytes]:
    """Every listed restore point of the VM and its disk's bytes, read as the mount reads."""
    from tests.support.maint import read_disk, rp_ids

    return {rp: read_disk(repo, VM, rp) for rp in rp_ids(repo, VM)}


def _problems(result: Any) -> str:
    return "; ".join(f"{p.subject}: {p.message}" for p in result.problems)


def _healthy(repo: Path, pruning: bytes | None = None) -> None:
    """verify passes; gc, then rebuild-index, then verify pass too, and list the same.

    gc tombstones the record of an ingest cut before its commit; rebuild-index
    after it must then bring back exactly the restore points listed before:
    nothing half-made, nothing committed lost.  The one exception is the
    restore point a cut prune was removing (content ``pruning``): once its
    tombstone is durable, rebuild-index honours it, and the prune completes.
    """
    from repofs.maintenance.gc import collect_garbage
    from repofs.maintenance.rebuild import rebuild_index
    from repofs.maintenance.verify.checks import verify_repository

    result = verify_repository(str(repo), threads=2)
    assert result.ok, f"verify after the cut: {_problems(result)}"
    collect_garbage(str(repo))
    listed = _restore_points(repo)
    rebuilt = rebuild_index(str(repo), threads=2, progress=False)
    assert not rebuilt.incomplete and not rebuilt.damaged, rebuilt
    now = _restore_points(repo)
    for rp, data in listed.items():
        if rp not in now:
            assert data == pruning, f"rebuild-index after gc lost restore point {rp}"
    assert now.items() <= listed.items(), "rebuild-index after gc brought back restore points"
    result = verify_repository(str(repo), threads=2)
    assert result.ok, f"verify after gc and rebuild-index: {_problems(result)}"


def _expect(found: dict[str, bytes], must: list[bytes], may: list[bytes]) -> list[bytes]:
    """Each restore point reads back one of the expected images; returns those it found."""
    contents = list(found.values())
    for rp, data in found.items():
        assert data in must + may, f"restore point {rp} reads back bytes that were never ingested"
    for want in must:
        assert want in contents, "a restore point committed before the cut is gone"
    assert len(contents) == len(set(contents)), "a restore point is listed twice"
    return contents


def _prepare_with(rps: list[str]) -> Callable[[Path], None]:
    def prepare(base: Path) -> None:
        from tests.support.maint import ingest_here

        _images(base)
        repo = _new_repo(base)
        for name in rps:
            ingest_here(repo, VM, {"d0": base.parent / "images" / name})

    return prepare


def _check_init(base: Path) -> bool:
    from tests.support.maint import ingest_here, read_disk

    repo = base / "repo"
    if not (repo / "config.json").exists():
        from repofs.store.repository import Repository

        if repo.exists():
            Repository.init(str(repo), CHUNK, "zstd:3").close()  # an interrupted init: again
        return False
    image = base.parent / "images" / "a.img"
    rp = ingest_here(repo, VM, {"d0": image})
    assert read_disk(repo, VM, rp) == image.read_bytes()
    _healthy(repo)
    return True


def _check_ingest(new_image: str) -> Callable[[Path], object]:
    def check(base: Path) -> bool:
        repo = base / "repo"
        old, new = _image(base, "a.img"), _image(base, new_image)
        contents = _expect(_restore_points(repo), [old], [new])
        _healthy(repo)
        return new in contents

    return check


def _check_gc(base: Path) -> None:
    repo = base / "repo"
    _expect(_restore_points(repo), [_image(base, "b.img")], [])
    _healthy(repo)


def _check_rebuild(base: Path) -> None:
    repo = base / "repo"
    _expect(_restore_points(repo), [_image(base, "a.img"), _image(base, "b.img")], [])
    _healthy(repo)


def _check_oldest_removed(base: Path) -> bool:
    """After prune or delete of the older restore point: it is gone whole or still whole."""
    repo = base / "repo"
    old = _image(base, "a.img")
    contents = _expect(_restore_points(repo), [_image(base, "b.img")], [old])
    _healthy(repo, pruning=old)
    return old not in contents


def _prepare_init(base: Path) -> None:
    base.mkdir(parents=True)
    _images(base)


def _prepare_gc(base: Path) -> None:
    """rp1 pruned, rp2 sharing a tenth of it: gc copies live records, deletes the rest."""
    from repofs.maintenance.prune import Policy, prune_repository

    _prepare_with(["a.img", "b.img"])(base)
    prune_repository(str(base / "repo"), Policy(last=1))


V1_FIXTURE = Path(__file__).parents[1] / "data" / "v1-repository.tar.gz"
V1_VM, V1_RP = "web", "2026-12-07T162524Z"  # the fixture's VM and its older restore point


def _prepare_v1(base: Path) -> None:
    """The version-1 repository of tests/data, which protect upgrades before it writes."""
    import tarfile

    base.mkdir(parents=True)
    with tarfile.open(V1_FIXTURE) as tar:
        tar.extractall(base, filter="data")
    os.chmod(base / "repo", 0o700)


def _check_protect_v1(base: Path) -> bool:
    """Version 1 or 2, both restore points whole and listed; the flag only once committed.

    Between the protection record and the index transaction the index says
    unprotected and rebuild-index protected: the two states a cut may leave.
    """
    from repofs.maintenance.gc import collect_garbage
    from repofs.maintenance.rebuild import rebuild_index
    from repofs.maintenance.verify.checks import verify_repository
    from repofs.store.config import RepoConfig
    from repofs.store.repository import Repository

    repo = base / "repo"
    assert RepoConfig.load(str(repo)).version in (1, 2)
    with Repository.open(str(repo)) as r:
        flags = {rp.id: rp.protected for rp in r.restore_points(V1_VM)}
    assert len(flags) == 2 and V1_RP in flags, flags
    result = verify_repository(str(repo), threads=2)
    assert result.ok, f"verify after the cut: {_problems(result)}"
    collect_garbage(str(repo))
    rebuilt = rebuild_index(str(repo), threads=2, progress=False)
    assert not rebuilt.incomplete and not rebuilt.damaged, rebuilt
    with Repository.open(str(repo)) as r:
        after = {rp.id: rp.protected for rp in r.restore_points(V1_VM)}
    assert after.keys() == flags.keys(), "rebuild-index changed the restore points"
    assert after[V1_RP] or not flags[V1_RP], "rebuild-index lost a committed protection"
    result = verify_repository(str(repo), threads=2)
    assert result.ok, f"verify after gc and rebuild-index: {_problems(result)}"
    return flags[V1_RP]


def _oldest(repo: Path) -> str:
    from tests.support.maint import rp_ids

    return rp_ids(repo, VM)[0]
def _ingest_argv(base: Path, *args: str) -> list[str]:
    """``ingest`` into the campaign's repository; ``disk=name`` names a file of the images."""
    images = base.parent / "images"
    argv = ["ingest", str(base / "repo"), "--vm", VM]
    for a in args:
        disk, _, name = a.partition("=")
        argv.append(a if a.startswith("--") else f"{disk}={images / name}")
    return argv


def scenarios() -> dict[str, Scenario]:
    """Every command whose cuts the campaign checks, by name."""
    return {
        s.name: s
        for s in (
            Scenario(
                "init",
                _prepare_init,
                lambda base: ["init", "--chunk-size", "64K", str(base / "repo")],
                _check_init,
            ),
            Scenario(
                "ingest",
                _prepare_with(["a.img"]),
                lambda base: _ingest_argv(base, "d0=b.img"),
                _check_ingest("b.img"),
            ),
            Scenario(
                "ingest-cbt",
                _prepare_with(["a.img"]),
                lambda base: _ingest_argv(base, "--changed-blocks", "d0=c.json", "d0=c.img"),
                _check_ingest("c.img"),
            ),
            Scenario("gc", _prepare_gc, lambda base: ["gc", str(base / "repo")], _check_gc),
            Scenario(
                "rebuild-index",
                _prepare_with(["a.img", "b.img"]),
                lambda base: ["rebuild-index", str(base / "repo")],
                _check_rebuild,
            ),
            Scenario(
                "prune",
                _prepare_with(["a.img", "b.img"]),
                lambda base: ["prune", str(base / "repo"), "--keep-last", "1"],
                _check_oldest_removed,
            ),
            Scenario(
                "delete",
                _prepare_with(["a.img", "b.img"]),
                lambda base: ["delete", str(base / "repo"), VM, _oldest(base / "repo")],
                _check_oldest_removed,
            ),
            Scenario(
                "protect-v1",
                _prepare_v1,
                lambda base: ["protect", str(base / "repo"), V1_VM, V1_RP],
                _check_protect_v1,
            ),
        )
    }
