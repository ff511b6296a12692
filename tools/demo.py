"""The demo behind ``tools/demo``: every step printed with the command an administrator types."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tools.sample_disk import build, partition_offsets

REPOFS = [sys.executable, "-m", "repofs"]


def step(title: str, *cmd: str, show: bool = True) -> str:
    words = ["repofs", *cmd[len(REPOFS) :]] if list(cmd[: len(REPOFS)]) == REPOFS else list(cmd)
    shown = " ".join(shlex.quote(c) for c in words)
    print(f"\n== {title}\n$ {shown}", flush=True)
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"demo: step failed: {shown}\n{out.stderr}")
    if show and out.stdout:
        print(out.stdout.rstrip())
    return out.stdout


def tree(root: Path) -> None:
    print(f"\n== The mounted tree at {root}")
    for dirpath, dirnames, filenames in sorted(os.walk(root)):
        dirnames[:] = sorted(d for d in dirnames if not (Path(dirpath) / d).is_symlink()) + sorted(
            d for d in dirnames if (Path(dirpath) / d).is_symlink()
        )
        depth = len(Path(dirpath).relative_to(root).parts)
        print("    " * depth + (Path(dirpath).name or str(root)) + "/")
        links = [d for d in dirnames if (Path(dirpath) / d).is_symlink()]
        for name in sorted(filenames + links):
            p = Path(dirpath) / name
            if p.is_symlink():
                print("    " * (depth + 1) + f"{name} -> {os.readlink(p)}")
            else:
                st = p.stat()
                print(
                    "    " * (depth + 1)
                    + f"{name}  ({st.st_size} bytes, {st.st_blocks * 512} on disk)"
                )


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="repofs-demo-"))
    repo, mnt, disk = work / "repo", work / "mnt", work / "sample-disk0.img"
    mnt.mkdir()
    print(f"demo: working in {work}")
    ingest = (*REPOFS, "ingest", str(repo), "--vm", "sample", f"disk0={disk}", "--format", "raw")
    build(disk, 1)
    # The unattended way: the passphrase in an owner-only file outside the repository
    # (or REPOFS_PASSPHRASE, or --key-file), never on the command line, never a prompt.
    secret = work / "passphrase"
    secret.touch(mode=0o600)
    secret.write_text(os.urandom(24).hex() + "\n")
    os.environ["REPOFS_PASSPHRASE_FILE"] = str(secret)  # for the steps after init
    print(f"\n== A passphrase for unattended jobs, in {secret} (mode 0600)")
    step(
        "Create an encrypted repository (AES-256-GCM by default)",
        *REPOFS,
        "init",
        str(repo),
        "--passphrase-file",
        str(secret),
    )
    print(f"(the next commands find the passphrase through REPOFS_PASSPHRASE_FILE={secret})")
    step("Ingest day 1 of the sample VM (GPT: FAT, ext4, NTFS)", *ingest)
    build(disk, 2)
    step("Ingest day 2, after a few files changed", *ingest)
    step("List restore points", *REPOFS, "list", str(repo))
    step("Repository statistics", *REPOFS, "stats", str(repo))
    step("Mount every restore point", *REPOFS, "mount", str(repo), str(mnt))
    try:
        tree(mnt)
        latest = mnt / "sample" / "latest"
        flat = latest / "disk0-flat.vmdk"
        step("qemu reads the exposed VMDK", "qemu-img", "info", str(latest / "disk0.vmdk"))
        step(
            "qemu finds it identical to the source disk",
            "qemu-img",
            "compare",
            str(disk),
            str(latest / "disk0.vmdk"),
        )
        fat, ext, _ntfs = partition_offsets(flat)
        step(
            "A file out of the FAT partition (mtools, offset from sfdisk -J)",
            "mtype",
            "-i",
            f"{flat}@@{fat[0]}",
            "::/EFI/grub.cfg",
        )
        if os.geteuid() == 0:
            dev = step(
                "Attach the ext4 partition read-only",
                "losetup",
                "-f",
                "--show",
                "-r",
                "-o",
                str(ext[0]),
                "--sizelimit",
                str(ext[1]),
                str(flat),
            ).strip()
            try:
                step("Check it", "e2fsck", "-fn", dev)
                step(
                    "Read a file from it without mounting",
                    "debugfs",
                    "-R",
                    "cat /etc/hostname",
                    dev,
                )
            finally:
                subprocess.run(["losetup", "-d", dev])
    finally:
        step("Unmount", *REPOFS, "umount", str(mnt))
    print(
        f"\ndemo: done; the repository stays in {repo}, its passphrase in {secret} "
        f"(delete both with: rm -rf {work})"
    )


if __name__ == "__main__":
    main()
