"""repofs: a deduplicated repository of image-level VM backups, mounted as flat VMDKs."""

__version__ = "0.1.0"
