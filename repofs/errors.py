"""One small hierarchy of expected failures.

The CLI catches :class:`RepofsError` once and prints its message as a single
line; anything else escaping is a bug and keeps its traceback.
"""


class RepofsError(Exception):
    """An expected failure with a message fit for an administrator."""

    exit_code = 1


class UsageError(RepofsError):
    """The command line names something invalid (a bad name, option or path)."""

    exit_code = 2


class RepositoryError(RepofsError):
    """The repository is missing, not a repository, or of an unsupported format."""

    exit_code = 3


class IndexAccessError(RepositoryError):
    """The system refuses the index (read-only file system, permissions, memory): not damage.

    Kept apart so that verify does not report it as damage, nor send anyone
    to rebuild-index, which could not help.
    """


class SourceError(RepofsError):
    """A disk source or changed-block list is unreadable or malformed."""

    exit_code = 4


class IntegrityError(RepofsError):
    """Stored data is missing or does not match its digest."""

    exit_code = 5


class BusyError(RepofsError):
    """Another process holds the repository in a way that excludes this operation."""

    exit_code = 6


class MountError(RepofsError):
    """The mount could not be started or stopped."""

    exit_code = 7


class NoSpaceError(RepofsError):
    """The repository's filesystem ran out of space; nothing committed was harmed."""

    exit_code = 8
