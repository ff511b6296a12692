"""One small hierarchy of expected failures.

The CLI catches :class:`RepofsError` once and prints its message as a single
line; anything else escaping is a bug and keeps its traceback.  Each kind
names its exit status in its class line (``exit_code=``), so that the table of
statuses reads at a glance and a subclass without one inherits its parent's.
"""


class RepofsError(Exception):
    """An expected failure with a message fit for an administrator."""

    exit_code = 1

    def __init_subclass__(cls, exit_code: int | None = None, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if exit_code is not None:
            cls.exit_code = exit_code


class UsageError(RepofsError, exit_code=2):
    """The command line names something invalid (a bad name, option or path)."""


class RepositoryError(RepofsError, exit_code=3):
    """The repository is missing, not a repository, or of an unsupported format."""


class IndexAccessError(RepositoryError):
    """The system refuses the index (read-only file system, permissions, memory): not damage.

    Kept apart so that verify does not report it as damage, nor send anyone
    to rebuild-index, which could not help.
    """


class SourceError(RepofsError, exit_code=4):
    """A disk source or changed-block list is unreadable or malformed."""


class IntegrityError(RepofsError, exit_code=5):
    """Stored data is missing or does not match its digest."""


class BusyError(RepofsError, exit_code=6):
    """Another process holds the repository in a way that excludes this operation."""


class MountError(RepofsError, exit_code=7):
    """The mount could not be started or stopped."""


class NoSpaceError(RepofsError, exit_code=8):
    """The repository's filesystem ran out of space; nothing committed was harmed."""
