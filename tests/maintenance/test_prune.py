"""prune: grandfather-father-son retention per VM, tombstones first, children never broken."""

from __future__ import annotations

import calendar
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from repofs.maintenance.prune import Decision, Policy, plan
from repofs.store.records import RecordType
from repofs.store.repository import Repository
from repofs.store.restorepoint import RestorePoint
from tests.support.helpers import assert_one_line_error, make_image, mounted, qemu_compare, repofs
from tests.support.maint import MiB, ingest_here, new_repo, noise, read_disk, rp_ids

HOUR = 3600
History = tuple[Path, Path, list[str]]
DAY = 24 * HOUR


def utc(text: str) -> float:
    return float(calendar.timegm(time.strptime(text, "%Y-%m-%d %H:%M")))


def rps_at(*times: float) -> list[RestorePoint]:
    return [
        RestorePoint(
            vm="vm",
            id=time.strftime("%Y-%m-%dT%H%M%SZ", time.gmtime(t)),
            seq=i + 10,
            vm_seq=1,
            created=t,
            chunk_size=65536,
        )
        for i, t in enumerate(times)
    ]


def kept(decisions: list[Decision]) -> list[str]:
    return [d.rp.id for d in decisions if d.keep]


class TestPolicy:
    def test_keep_last(self) -> None:
        """--keep-last N keeps the N newest, whatever their times."""
        rps = rps_at(*(utc("2026-01-01 00:00") + i * 60 for i in range(10)))
        ds = plan(rps, Policy(last=3))
        assert kept(ds) == [rp.id for rp in rps[-3:]][::-1]
        assert [d.reasons for d in ds if d.keep] == [["last #1"], ["last #2"], ["last #3"]]

    def test_daily_keeps_the_newest_of_each_day_in_utc(self) -> None:
        """Several restore points a day: only the day's newest counts, days are UTC days."""
        rps = rps_at(
            utc("2026-03-01 01:00"),
            utc("2026-03-01 23:30"),
            utc("2026-03-02 00:10"),
            utc("2026-03-02 12:00"),
            utc("2026-03-03 09:00"),
        )
        ds = plan(rps, Policy(daily=2))
        assert kept(ds) == [rps[4].id, rps[3].id]

    def test_weekly_uses_iso_weeks_across_new_year(self) -> None:
        """2020-12-31 and 2021-01-03 are the same ISO week (2020-W53), so weekly keeps one."""
        rps = rps_at(utc("2020-12-31 10:00"), utc("2021-01-03 10:00"), utc("2021-01-04 10:00"))
        assert kept(plan(rps, Policy(weekly=5))) == [rps[2].id, rps[1].id]

    def test_rules_combine_and_list_every_reason(self) -> None:
        """Each rule counts on its own; a restore point kept by several says so."""
        t0 = utc("2026-05-10 08:00")
        rps = rps_at(t0 - 40 * DAY, t0 - 2 * DAY, t0 - DAY, t0 - HOUR, t0)
        ds = {d.rp.id: d.reasons for d in plan(rps, Policy(last=1, daily=2, monthly=2))}
        assert ds[rps[4].id] == ["last #1", "daily #1", "monthly #1"]
        assert ds[rps[2].id] == ["daily #2"]
        assert ds[rps[0].id] == ["monthly #2"]
        assert ds[rps[3].id] == [] and ds[rps[1].id] == []

    def test_hourly_and_yearly(self) -> None:
        """Hourly buckets by UTC hour, yearly by UTC year."""
        rps = rps_at(
            utc("2024-06-01 10:05"),
            utc("2025-06-01 10:05"),
            utc("2025-06-01 10:55"),
            utc("2025-06-01 11:01"),
        )
        assert kept(plan(rps, Policy(hourly=2))) == [rps[3].id, rps[2].id]
        assert kept(plan(rps, Policy(yearly=5))) == [rps[3].id, rps[0].id]

    @settings(max_examples=200, deadline=None)
    @given(
        times=st.lists(st.integers(0, 3 * 365 * DAY), min_size=0, max_size=40, unique=True),
        counts=st.tuples(*[st.integers(0, 4)] * 6),
    )
    def test_properties(self, times: list[int], counts: tuple[int, ...]) -> None:
        """Any policy: the newest survives if anything is kept, --keep-last is exact, and
        applying the policy again to what it kept removes nothing more."""
        policy = Policy(*counts)
        rps = rps_at(*(utc("2024-01-01 00:00") + t for t in times))
        ds = plan(rps, policy)
        keep = [d.rp for d in ds if d.keep]
        if rps and not policy.keeps_nothing():
            assert ds[0].keep and ds[0].rp.created == max(rp.created for rp in rps)
        if policy.keeps_nothing():
            assert not keep
        last = [d for d in ds if any(r.startswith("last #") for r in d.reasons)]
        assert len(last) == min(policy.last, len(rps))
        assert all(d.keep for d in plan(keep, policy))

    def test_negative_counts_are_refused(self) -> None:
        """A negative count is a usage error, not a policy."""
        with pytest.raises(Exception, match="zero or more"):
            Policy(daily=-1)


@pytest.fixture
def history(tmp_path: Path) -> History:
    """VM web with four restore points over three UTC days, and VM db with one."""
    repo = new_repo(tmp_path / "repo")
    img = make_image(tmp_path / "web.img", 4 * MiB, [(0, noise(MiB, 1))])
    ids = []
    for k, when in enumerate(
        ["2026-01-01 10:00", "2026-01-02 09:00", "2026-01-02 18:00", "2026-01-03 07:00"]
    ):
        with open(img, "r+b") as f:
            f.seek(2 * MiB)
            f.write(noise(256 * 1024, 10 + k))
        ids.append(ingest_here(repo, "web", {"d0": img}, now=utc(when)))
    db = make_image(tmp_path / "db.img", MiB, [(0, noise(4096, 5))])
    ingest_here(repo, "db", {"d0": db}, now=utc("2026-01-01 00:00"))
    return repo, img, ids


class TestPruneCommand:
    def test_dry_run_explains_and_changes_nothing(self, history: History) -> None:
        """--dry-run prints each decision with its rule and leaves every restore point."""
        repo, _img, ids = history
        proc = repofs("prune", repo, "--vm", "web", "--keep-daily", "2", "--dry-run")
        out = proc.stdout
        assert f"web              {ids[3]}  keep  (daily #1)" in out
        assert f"web              {ids[2]}  keep  (daily #2)" in out
        assert f"{ids[1]}  would remove" in out and f"{ids[0]}  would remove" in out
        assert "dry run: would remove 2 restore point(s)" in out
        assert rp_ids(repo, "web") == ids

    def test_removes_with_tombstones_and_points_to_gc(self, history: History) -> None:
        """A real prune removes what the policy drops, tombstones each, and points to gc."""
        repo, _img, ids = history
        out = repofs("prune", repo, "--keep-daily", "2").stdout
        assert "removed 2 restore point(s); run 'repofs gc" in out
        assert rp_ids(repo, "web") == ids[2:]
        assert len(rp_ids(repo, "db")) == 1  # its own newest day
        with Repository.open(str(repo)) as r:
            assert r.stats()["restore_points"] == 3
            tomb = bytes((RecordType.TOMBSTONE,))
            tombs = r.index.read(lambda t: list(r.index.items(t, "objects", tomb)))
            assert len(tombs) == 2
        assert "nothing to remove" in repofs("prune", repo, "--keep-daily", "2").stdout

    def test_keep_nothing_needs_force(self, history: History) -> None:
        """A policy that keeps nothing is refused unless --force, which then removes everything."""
        repo, _img, ids = history
        proc = repofs("prune", repo, "--vm", "web", check=False)
        assert_one_line_error(proc, "keeps nothing", "--force")
        assert rp_ids(repo, "web") == ids
        repofs("prune", repo, "--vm", "web", "--force")
        assert rp_ids(repo, "web") == [] and len(rp_ids(repo, "db")) == 1
        with Repository.open(str(repo)) as r:  # the VM keeps its sequence number (inode)
            assert r.index.read(lambda t: r.index.vm_seq(t, "web")) is not None

    @pytest.mark.parametrize(
        "args,needle",
        [
            (["--keep-last", "-1"], "-1"),
            (["--keep-daily", "many"], "many"),
            (["--vm", "ghost", "--keep-last", "1"], "unknown VM"),
            (["--vm", "..", "--keep-last", "1"], "not allowed"),
        ],
    )
    def test_bad_input(self, history: History, args: list[str], needle: str) -> None:
        """Bad options: one line, non-zero exit, nothing removed."""
        repo, _img, ids = history
        assert_one_line_error(repofs("prune", repo, *args, check=False), needle)
        assert rp_ids(repo, "web") == ids

    def test_pruned_restore_point_leaves_the_mount_and_others_read_back(
        self, tmp_path: Path, history: History
    ) -> None:
        """After prune and gc, the mount lists only what was kept and reads it back intact."""
        repo, img, ids = history
        expected = read_disk(repo, "web", ids[3])
        repofs("prune", repo, "--keep-last", "1")
        repofs("gc", repo)
        repofs("verify", repo)
        with mounted(repo, tmp_path / "mnt") as mnt:
            assert sorted(p.name for p in (mnt / "web").iterdir()) == sorted([ids[3], "latest"])
            assert (mnt / "web" / ids[3] / "d0-flat.vmdk").read_bytes() == expected
        del img

    def test_a_restore_point_pruned_under_a_running_mount_is_gone_from_stat_too(
        self, tmp_path: Path, history: History
    ) -> None:
        """A name the kernel has looked up stops answering ``stat`` within about a second of
        the prune, as it leaves ``ls``: the entry timeout is short even for restore points."""
        repo, _img, ids = history
        with mounted(repo, tmp_path / "mnt") as mnt:
            old = mnt / "web" / ids[0] / "d0-flat.vmdk"
            assert old.stat().st_size > 0  # now in the kernel's dentry cache
            repofs("prune", repo, "--keep-last", "1")
            deadline = time.monotonic() + 5
            while old.exists() and time.monotonic() < deadline:
                time.sleep(0.2)
            assert not old.exists()
            assert not (mnt / "web" / ids[0]).exists()
            assert sorted(p.name for p in (mnt / "web").iterdir()) == sorted([ids[3], "latest"])


class TestCbtChildren:
    def test_child_survives_parent_prune_and_gc(self, tmp_path: Path) -> None:
        """A CBT child shares pages with its parent; pruning the parent and gc leave it whole."""
        repo = new_repo(tmp_path / "repo")
        img = make_image(
            tmp_path / "vm.img", 96 * MiB, [(k * 8 * MiB, noise(MiB, k)) for k in range(12)]
        )
        parent = ingest_here(repo, "app", {"d0": img}, now=utc("2026-02-01 00:00"))
        with open(img, "r+b") as f:
            f.seek(17 * MiB)
            f.write(noise(300_000, 99))
        child = ingest_here(
            repo,
            "app",
            {"d0": img},
            changed={"d0": [(17 * MiB, 300_000)]},
            now=utc("2026-02-02 00:00"),
        )
        with Repository.open(str(repo)) as r:
            rp = r.resolve("app", child)
            assert rp.kind == "cbt" and rp.parent == parent
        repofs("prune", repo, "--keep-last", "1")
        repofs("gc", repo)
        repofs("verify", repo)
        with mounted(repo, tmp_path / "mnt") as mnt:
            qemu_compare(img, mnt / "app" / child / "d0-flat.vmdk")
