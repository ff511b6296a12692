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
    problems: list[Problem] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    vms: int = 0
    restore_points: int = 0
    pages: int = 0
    objects_checked: int = 0
    bytes_checked: int = 0
    elapsed: float = 0.0
    sample: float | None = None

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, object]:
        """``verify --json``: every field, and ``ok``."""
        return {"ok": self.ok, **asdict(self)}
