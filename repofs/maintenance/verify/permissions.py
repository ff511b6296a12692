"""Repositories are owner-only: the files and directories of one that others may access.

Apart from the checks because both verify paths report it, the one with a
usable index and the one without (:mod:`.noindex`).
"""

from __future__ import annotations

import os
import stat


def permission_warnings(repo_path: str) -> list[str]:
    """Files and directories of the repository that anyone but the owner may access."""
    out = []
    for dirpath, dirnames, filenames in os.walk(repo_path):
        for name in [".", *dirnames, *filenames]:
            p = os.path.normpath(os.path.join(dirpath, name))
            if name == "." and dirpath != repo_path:
                continue
            try:
                mode = os.lstat(p).st_mode
            except OSError:
                continue
            if stat.S_ISLNK(mode):
                continue
            if mode & 0o077:
                out.append(
                    f"{p} is accessible to others than its owner "
                    f"(mode {stat.S_IMODE(mode):04o}; repositories are owner-only)"
                )
    return out
