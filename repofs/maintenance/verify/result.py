"""What ``repofs verify`` found: the object the CLI prints and ``verify --json`` dumps.

Apart from the checks so that the index-less path (:mod:`.noindex`) and the
damage mapping (:mod:`.damage`) fill in the same object without importing
the verifier.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class Problem:
    """Something stored that is missing or wrong, and what it harms."""

    subject: str
    message: str
    affects: list[str] = field(default_factory=list)


@dataclass
class VerifyResult:
    """What one run found and covered; its fields are the keys of ``verify --json``."""

    problems: list[Problem] = field(default_factory=list)  #: any of them: exit status 5
    warnings: list[str] = field(default_factory=list)  #: harmless (leftovers, loose modes): exit 0
    vms: int = 0  #: VMs checked (of ``--vm``: one)
    restore_points: int = 0  #: restore points checked; without an index, those the packs hold
    pages: int = 0  #: map pages loaded with their digest checked (a shared page once)
    objects_checked: int = 0  #: records re-read and re-hashed from the packs
    bytes_checked: int = 0  #: their bytes as stored (headers included)
    elapsed: float = 0.0  #: seconds, from opening the repository to the last check
    sample: float | None = None  #: ``--sample``: the percentage of chunks re-read; None: all
    mode: str = "full"  #: "full" (re-read and re-hash), or "sizes" (``--sizes-only``)
    packs: int = 0  #: packs the index names, each checked to exist with its size
    log_objects: int = 0  #: a bucket's log objects and newest checkpoint decoded; else 0
    #: a bucket's requests by kind (GET, LIST, HEAD, PUT, DELETE) and bytes moved; else None
    requests: dict[str, int] | None = None

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, object]:
        """``verify --json``: every field, and ``ok``."""
        return {"ok": self.ok, **asdict(self)}
