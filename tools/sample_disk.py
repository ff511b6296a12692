"""A small but real VM disk for the demo and the tests: GPT, FAT, ext4 and NTFS partitions.

Built without root and without mounting anything: ``sfdisk`` writes the
partition table, ``mkfs.ext4 -d`` populates ext4 from a directory, mtools
fills FAT, ``mkntfs`` formats NTFS; each file system is made in its own file
and spliced into the sparse disk image at its partition's offset.
``version`` 2 changes a few files (the "day two" of a backup).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

MiB = 1 << 20
DISK_SIZE = 256 * MiB
# name, type, start MiB, size MiB
PARTITIONS = [("efi", "vfat", 1, 32), ("root", "ext4", 33, 128), ("data", "ntfs", 161, 64)]
GPT_TYPES = {
    "vfat": "C12A7328-F81F-11D2-BA4B-00A0C93EC93B",
    "ext4": "0FC63DAF-8483-4772-8E79-3D69E4C47DE4",
    "ntfs": "EBD0A0A2-B9E5-4433-87C0-68B6B72699C7",
}


def _run(*cmd: str, stdin: str | None = None) -> None:
    subprocess.run(cmd, input=stdin, text=True, check=True, capture_output=True)


def _root_tree(tree: Path, version: int) -> None:
    (tree / "etc").mkdir(parents=True)
    (tree / "etc" / "hostname").write_text(f"sample-vm-{version}\n")
    (tree / "etc" / "os-release").write_text('NAME="repofs sample"\nVERSION_ID="1"\n')
    (tree / "usr" / "bin").mkdir(parents=True)
    for name in ("ls", "cp", "tar"):
        src = shutil.which(name)
        if src:
            shutil.copy(src, tree / "usr" / "bin" / name)
    (tree / "var" / "log").mkdir(parents=True)
    log = "".join(f"day {d}: service started\n" for d in range(1, version + 1))
    (tree / "var" / "log" / "messages").write_text(log * 200)
    (tree / "home").mkdir()
    (tree / "home" / "report.txt").write_text(f"quarterly report, revision {version}\n" * 100)


def build(path: Path, version: int = 1) -> dict[str, dict[str, int]]:
    """Write the disk image at ``path``; return each partition's byte offset and size."""
    with open(path, "wb") as f:
        f.truncate(DISK_SIZE)
    script = "label: gpt\n" + "".join(
        f"start={start * 2048}, size={size * 2048}, type={GPT_TYPES[kind]}, name={name}\n"
        for name, kind, start, size in PARTITIONS
    )
    _run("sfdisk", "--no-reread", "--no-tell-kernel", "-q", str(path), stdin=script)
    layout = {}
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        for name, kind, start, size in PARTITIONS:
            fs = t / f"{name}.fs"
            with open(fs, "wb") as f:
                f.truncate(size * MiB)
            if kind == "vfat":
                _run("mformat", "-i", str(fs), "-v", "EFI", "::")
                _run("mmd", "-i", str(fs), "::/EFI")
                boot = t / "grub.cfg"
                boot.write_text(f"set default=0\n# sample version {version}\n")
                _run("mcopy", "-i", str(fs), str(boot), "::/EFI/grub.cfg")
            elif kind == "ext4":
                tree = t / "tree"
                _root_tree(tree, version)
                env = dict(os.environ, E2FSPROGS_FAKE_TIME="1790000000")
                subprocess.run(
                    [
                        "mkfs.ext4",
                        "-q",
                        "-F",
                        "-L",
                        "root",
                        "-d",
                        str(tree),
                        "-U",
                        "6b3e0b5e-2f0e-4a8e-9d57-5a3c1c0e0001",
                        "-E",
                        "hash_seed=6b3e0b5e-2f0e-4a8e-9d57-5a3c1c0e0002",
                        str(fs),
                    ],
                    check=True,
                    capture_output=True,
                    env=env,
                )
            else:
                _run(
                    "mkntfs",
                    "-F",
                    "-Q",
                    "-q",
                    "-L",
                    "data",
                    "-s",
                    "512",
                    "-p",
                    str(start * 2048),
                    "-H",
                    "255",
                    "-S",
                    "63",
                    str(fs),
                )
                note = t / "readme.txt"
                note.write_text(f"NTFS data volume, version {version}\n")
                _run("ntfscp", "-f", str(fs), str(note), "readme.txt")
            with open(fs, "rb") as src, open(path, "r+b") as dst:
                dst.seek(start * MiB)
                while block := src.read(MiB):
                    if block.count(0) == len(block):
                        dst.seek(len(block), os.SEEK_CUR)
                    else:
                        dst.write(block)
            layout[name] = {"offset": start * MiB, "size": size * MiB}
    return layout


def partition_offsets(image: Path) -> list[tuple[int, int]]:
    """(offset, size) in bytes of each partition, from ``sfdisk -J`` as the README shows."""
    out = subprocess.run(
        ["sfdisk", "-J", str(image)], capture_output=True, text=True, check=True
    ).stdout
    table = json.loads(out)["partitiontable"]
    sector = table.get("sectorsize", 512)
    return [(p["start"] * sector, p["size"] * sector) for p in table["partitions"]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("path", type=Path)
    parser.add_argument("--version", type=int, default=1)
    args = parser.parse_args()
    print(json.dumps(build(args.path, args.version), indent=2))


if __name__ == "__main__":
    main()
