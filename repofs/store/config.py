"""The repository's config file: format version, chunk size, codec and id.

It is written by ``init`` and changed only once more, by the upgrade of a
version-1 repository (:func:`upgrade_in_place`), so a reader can trust it.
Every field is checked on open, and a message names the file and the value
that was wrong.
"""

from __future__ import annotations

import json
import os
import re
import stat
from dataclasses import asdict, dataclass, fields

from repofs.errors import RepositoryError, UsageError
from repofs.store.crypto import EncryptionConfig
from repofs.store.durable import write_file_atomic

FORMAT_NAME = "repofs"
FORMAT_VERSION = 2
#: An encrypted repository's version: version 3 is version 2 with every record sealed
#: and an ``encryption`` object in config.json (an older repofs, which ignores fields it
#: does not know, must refuse it instead of misreading sealed records as damage).
ENCRYPTED_VERSION = 3
#: Versions this code opens; an older one is upgraded in place before its first pack write.
READABLE_VERSIONS = (1, 2, 3)
CONFIG_FILE = "config.json"
MIN_CHUNK = 4096
MAX_CHUNK = 4 * 1024 * 1024
# 128 KiB: against 64 KiB, a full ingest 15-30 % faster and 3.5 % smaller, cold random
# reads about 0.1 ms slower (measured, docs/performance.md "Chunk size").
DEFAULT_CHUNK = 128 * 1024
DEFAULT_COMPRESSION = "zstd:3"
PAGE_REFS = 1024
PACK_TARGET = 32 * 1024 * 1024
# gc and rebuild-index read a whole pack into memory; a pack per chunk would
# mean millions of files.
MIN_PACK_TARGET = 1024 * 1024
MAX_PACK_TARGET = 256 * 1024 * 1024

_SIZE = re.compile(r"^(\d+)\s*([kKmMgG]?)(i?[bB])?$")


def parse_size(text: str, what: str = "size") -> int:
    """Parse ``64K``, ``1M``, ``65536`` (binary units) into bytes; ``what`` names it in errors."""
    if not text.strip():
        raise UsageError(f"{what} is empty: expected e.g. 64K, 1M or 65536")
    m = _SIZE.match(text.strip())
    if not m:
        raise UsageError(f"cannot read {what} {text!r}: expected e.g. 64K, 1M or 65536")
    mult = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}[m.group(2).lower()]
    return int(m.group(1)) * mult


def size_label(n: int) -> str:
    """The short form :func:`parse_size` reads back: ``131072`` -> ``128K``."""
    for unit, mult in (("G", 1024**3), ("M", 1024**2), ("K", 1024)):
        if n % mult == 0:
            return f"{n // mult}{unit}"
    return str(n)


def parse_compression(text: str) -> tuple[str, int]:
    """Parse ``zstd:LEVEL`` or ``none``."""
    if text == "none":
        return "none", 0
    m = re.match(r"^zstd(?::(-?\d+))?$", text)
    if not m:
        raise UsageError(f"unknown compression {text!r}: expected zstd:LEVEL or none")
    level = int(m.group(1)) if m.group(1) is not None else 3
    if not 1 <= level <= 22:
        raise UsageError(f"zstd level {level} out of range 1..22")
    return "zstd", level


@dataclass(frozen=True)
class RepoConfig:
    """Everything about a repository that is fixed at ``init``."""

    format: str
    version: int
    repository_id: str
    chunk_size: int
    compression: str
    page_refs: int
    pack_target_size: int
    #: None in an unencrypted repository (versions 1 and 2); present in version 3 only.
    encryption: EncryptionConfig | None = None

    @classmethod
    def new(
        cls,
        chunk_size: int,
        compression: str,
        encryption: EncryptionConfig | None = None,
        pack_size: int = PACK_TARGET,
    ) -> RepoConfig:
        if chunk_size & (chunk_size - 1) or not MIN_CHUNK <= chunk_size <= MAX_CHUNK:
            raise UsageError(f"chunk size {chunk_size} must be a power of two from 4K to 4M")
        if not MIN_PACK_TARGET <= pack_size <= MAX_PACK_TARGET:
            raise UsageError(f"pack size {size_label(pack_size)} must be from 1M to 256M")
        codec, level = parse_compression(compression)
        return cls(
            format=FORMAT_NAME,
            version=FORMAT_VERSION if encryption is None else ENCRYPTED_VERSION,
            repository_id=os.urandom(16).hex(),
            chunk_size=chunk_size,
            compression=f"zstd:{level}" if codec == "zstd" else "none",
            page_refs=PAGE_REFS,
            pack_target_size=pack_size,
            encryption=encryption,
        )

    @property
    def codec(self) -> str:
        return parse_compression(self.compression)[0]

    @property
    def level(self) -> int:
        return parse_compression(self.compression)[1]

    @property
    def cipher(self) -> str:
        """``none``, or the AEAD that seals every record."""
        return self.encryption.cipher if self.encryption is not None else "none"

    def to_json(self) -> bytes:
        doc = asdict(self)
        if self.encryption is None:
            del doc["encryption"]
        else:
            doc["encryption"] = self.encryption.to_doc()
        return (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode()

    @classmethod
    def load(cls, repo_path: str) -> RepoConfig:
        if not repo_path:
            raise UsageError("the repository path is empty")
        path = os.path.join(repo_path, CONFIG_FILE)
        if not os.path.exists(repo_path):
            raise RepositoryError(f"{repo_path}: no such repository")
        if not os.path.isdir(repo_path):
            raise RepositoryError(f"{repo_path}: is not a directory, so not a repository")
        try:
            # Non-blocking and regular files only: a FIFO there would hang every command.
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
            with open(fd, "rb") as f:
                if not stat.S_ISREG(os.fstat(fd).st_mode):
                    raise RepositoryError(f"{path}: is not a regular file")
                os.set_blocking(fd, True)
                raw = f.read(65536)
        except FileNotFoundError:
            raise RepositoryError(
                f"{repo_path}: not a repofs repository (no {CONFIG_FILE})"
            ) from None
        except OSError as exc:
            raise RepositoryError(f"{path}: cannot read: {exc.strerror}") from None
        return cls.parse(raw, path)

    @classmethod
    def parse(cls, raw: bytes, path: str) -> RepoConfig:
        """Check and read a config's bytes; ``path`` names where they came from in errors."""
        try:
            data = json.loads(raw)
        except ValueError:
            raise RepositoryError(f"{path}: is not valid JSON") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
            raise RepositoryError(f"{path}: not a repofs config (format field is wrong)")
        version = data.get("version")
        if "version" in data and _not_int(version):
            raise RepositoryError(f"{path}: version {_shown(version)} is not an integer")
        if version not in READABLE_VERSIONS:
            newer = isinstance(version, int) and version > READABLE_VERSIONS[-1]
            raise RepositoryError(
                f"{path}: format version {_shown(version)} is not supported "
                f"(this repofs reads versions 1 to {READABLE_VERSIONS[-1]}"
                + ("; it was written by a newer repofs)" if newer else ")")
            )
        encryption = None
        if version == ENCRYPTED_VERSION:
            encryption = EncryptionConfig.from_doc(data.get("encryption"), path)
        elif "encryption" in data:
            raise RepositoryError(f"{path}: encryption in a version-{version} config")
        for field in fields(cls):
            if field.name == "encryption":
                continue
            if field.name not in data:
                raise RepositoryError(f"{path}: field {field.name!r} is missing")
            value = data[field.name]
            if field.type in (int, "int"):
                if _not_int(value):
                    raise RepositoryError(f"{path}: {field.name} {_shown(value)} is not an integer")
            elif not isinstance(value, str):
                raise RepositoryError(f"{path}: {field.name} {_shown(value)} is not a string")
        cfg = cls(
            **{field.name: data[field.name] for field in fields(cls) if field.name != "encryption"},
            encryption=encryption,
        )
        cs = cfg.chunk_size
        if cs & (cs - 1) or not MIN_CHUNK <= cs <= MAX_CHUNK:
            raise RepositoryError(f"{path}: chunk_size {cs} is not a power of two in 4K..4M")
        if not 16 <= cfg.page_refs <= 65536:
            raise RepositoryError(f"{path}: page_refs {cfg.page_refs} out of range 16..65536")
        if not MIN_PACK_TARGET <= cfg.pack_target_size <= MAX_PACK_TARGET:
            raise RepositoryError(
                f"{path}: pack_target_size {cfg.pack_target_size} out of range "
                f"{MIN_PACK_TARGET}..{MAX_PACK_TARGET} (1M..256M)"
            )
        if not re.fullmatch(r"[0-9a-f]{32}", cfg.repository_id):
            raise RepositoryError(
                f"{path}: repository_id {_shown(cfg.repository_id)} is not 32 hex digits"
            )
        try:
            parse_compression(cfg.compression)
        except UsageError as exc:
            raise RepositoryError(f"{path}: compression {_shown(cfg.compression)}: {exc}") from None
        return cfg


def upgrade_in_place(repo_path: str) -> bool:
    """Raise ``config.json`` to :data:`FORMAT_VERSION`; True if it was older.

    Version 2 only adds things (record fields and a record type, see
    docs/format.md), so nothing but this field changes: the file is
    replaced atomically (temporary file, fsync, rename, directory fsync), a
    crash leaves version 1 or version 2, and both open.  Every other field,
    unknown ones too, is kept as it was.  Called before the first pack of
    version 2 is written, so an older repofs never meets a record it would
    misread: it refuses the repository at open instead.
    """
    path = os.path.join(repo_path, CONFIG_FILE)
    RepoConfig.load(repo_path)  # the same checks as every open
    try:
        with open(path, "rb") as f:
            data = json.loads(f.read(65536))
    except (OSError, ValueError) as exc:
        raise RepositoryError(f"{path}: cannot read it to upgrade it: {exc}") from None
    if data["version"] >= FORMAT_VERSION:
        return False
    data["version"] = FORMAT_VERSION
    write_file_atomic(path, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode())
    return True


def _not_int(value: object) -> bool:
    """True unless ``value`` is a JSON integer.

    ``true`` is an int to Python and ``1.0 == 1``; a config holding either
    was not written by ``init``, so neither may pass as a number.
    """
    return isinstance(value, bool) or not isinstance(value, int)


def _shown(value: object) -> str:
    """``value`` as it looks in config.json, cut short to keep the error one short line."""
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."
