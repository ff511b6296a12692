"""Encryption at rest: object names, sealing, the index's names, and the repository key.

Encryption sits between records and the pack store (DESIGN.md): a record's
payload is compressed, then sealed with an AEAD before it is packed; its
name (the digest in the record header and in the index) is a keyed BLAKE3
digest, so equal plaintext still deduplicates inside the repository, but
nobody without the key can test whether a known file is in it.  The
associated data binds a format tag, the repository's content id (shared
with future replicas, unlike the pack or offset, so gc can move a record
and a replica can copy it unchanged), the record type and the name: a
record cannot be passed off as another.

:class:`Keys` is the unencrypted repository's view (plain BLAKE3, nothing
sealed); :class:`SealedKeys` the encrypted one's.  Both are created at open
time from the config and a key source (:func:`keys_for`) and handed to the
writer and every reader.

Key sources, never the command line: ``REPOFS_KEY_FILE`` / ``--key-file``
(a key file outside the repository, which holds the master key itself),
``REPOFS_PASSPHRASE_FILE`` / ``--passphrase-file``, ``REPOFS_PASSPHRASE``,
or a prompt on a terminal.  Every primitive comes from ``cryptography``
(AES-GCM, ChaCha20-Poly1305, Argon2id) and ``blake3`` (keyed and key
derivation modes); nothing here is hand-written cryptography.
"""

from __future__ import annotations

import getpass
import json
import os
import sys
import threading
from dataclasses import dataclass
from typing import Any

import blake3

from repofs.errors import IntegrityError, RepofsError, RepositoryError, UsageError
from repofs.store.durable import write_file_atomic

CIPHERS = ("aes-256-gcm", "chacha20-poly1305")
#: Measured on this machine (AES-NI, VAES): AES-256-GCM seals and opens 128 KiB chunks
#: at 1.8 GB/s against ChaCha20-Poly1305's 0.74 GB/s (docs/performance.md "Encryption").
DEFAULT_CIPHER = "aes-256-gcm"
NONCE_BYTES = 12
TAG_BYTES = 16
OVERHEAD = NONCE_BYTES + TAG_BYTES  #: what sealing adds to every payload
MASTER_BYTES = 32
KEY_FILE = "key"  #: REPO/key: the master key wrapped by a passphrase (passphrase mode)
AD_TAG = b"repofs-aead-1\0"
INDEX_AD_TAG = b"repofs-index-1\0"
WRAP_AD_TAG = b"repofs-key-1\0"

PASSPHRASE_ENV = "REPOFS_PASSPHRASE"
PASSPHRASE_FILE_ENV = "REPOFS_PASSPHRASE_FILE"
KEY_FILE_ENV = "REPOFS_KEY_FILE"
NEW_PASSPHRASE_ENV = "REPOFS_NEW_PASSPHRASE"
NEW_PASSPHRASE_FILE_ENV = "REPOFS_NEW_PASSPHRASE_FILE"
#: Test hook, unset in production: Argon2id with 64 KiB and one pass, so that a test
#: suite that creates hundreds of repositories does not spend minutes in the KDF.
WEAK_KDF_ENV = "REPOFS_TEST_WEAK_KDF"

#: Argon2id parameters of new key files (RFC 9106's second recommendation, 64 MiB, t=3,
#: with 4 lanes): about 0.2 s on this machine, paid once per command.
ARGON2_DEFAULT = {"memory_kib": 65536, "iterations": 3, "lanes": 4}
ARGON2_TEST = {"memory_kib": 64, "iterations": 1, "lanes": 1}
ARGON2_LIMITS = {"memory_kib": (8, 4 * 1024 * 1024), "iterations": (1, 64), "lanes": (1, 64)}

NO_SOURCE = (
    "no passphrase: set REPOFS_PASSPHRASE, pass --passphrase-file FILE, "
    "use --key-file FILE, or run on a terminal (or --encryption none at init)"
)


def _aead(cipher: str, key: bytes) -> Any:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

    return AESGCM(key) if cipher == "aes-256-gcm" else ChaCha20Poly1305(key)


def _subkey(master: bytes, purpose: str) -> bytes:
    return blake3.blake3(master, derive_key_context=f"repofs 2026-12 {purpose}").digest()


def key_id_of(master: bytes) -> str:
    """What the repository keeps to tell a wrong key (file) from the right one: reveals nothing."""
    return _subkey(master, "key id")[:16].hex()


class Keys:
    """An unencrypted repository: plain BLAKE3 names, payloads and index values as they are."""

    encrypted = False
    cipher = "none"

    def name(self, data: bytes | memoryview) -> bytes:
        return blake3.blake3(data).digest()

    def seal(self, rtype: int, name: bytes, payload: bytes) -> bytes:
        return payload

    def open(self, rtype: int, name: bytes, stored: bytes | memoryview, where: str) -> bytes:
        return stored if type(stored) is bytes else bytes(stored)

    # -- the index's names --------------------------------------------------------

    def vm_key(self, vm: str) -> bytes:
        return vm.encode()

    def vm_part(self, rps_key: bytes) -> bytes:
        """The VM part of an ``rps`` key (everything before the NUL)."""
        return rps_key.partition(b"\0")[0]

    def seal_value(self, db: str, key: bytes, value: bytes) -> bytes:
        return value

    def open_value(self, db: str, key: bytes, value: bytes) -> bytes:
        return value


PLAIN = Keys()


class SealedKeys(Keys):
    """An encrypted repository's keys, derived from its random master key."""

    encrypted = True

    def __init__(self, master: bytes, cipher: str, content_id: str) -> None:
        self.cipher = cipher
        self._name_key = _subkey(master, "object names")
        self._index_key = _subkey(master, "index names")
        self._aead_key = _subkey(master, f"aead {cipher}")
        self._content_id = bytes.fromhex(content_id)
        self._ad = AD_TAG + self._content_id
        self._index_ad = INDEX_AD_TAG + self._content_id
        self._local = threading.local()

    def _cipher(self) -> Any:
        aead = getattr(self._local, "aead", None)
        if aead is None:  # one per thread: nothing to share, nothing to lock
            aead = self._local.aead = _aead(self.cipher, self._aead_key)
        return aead

    def name(self, data: bytes | memoryview) -> bytes:
        return blake3.blake3(data, key=self._name_key).digest()

    def seal(self, rtype: int, name: bytes, payload: bytes) -> bytes:
        nonce = os.urandom(NONCE_BYTES)
        return nonce + self._cipher().encrypt(nonce, payload, self._ad + bytes((rtype,)) + name)

    def open(self, rtype: int, name: bytes, stored: bytes | memoryview, where: str) -> bytes:
        from cryptography.exceptions import InvalidTag

        if len(stored) < OVERHEAD:
            raise IntegrityError(f"{where}: sealed payload shorter than its nonce and tag")
        view = memoryview(stored)  # slices without copying a 128 KiB payload twice
        try:
            return self._cipher().decrypt(
                view[:NONCE_BYTES], view[NONCE_BYTES:], self._ad + bytes((rtype,)) + name
            )
        except InvalidTag:
            raise IntegrityError(
                f"{where}: does not authenticate (tampered with, or another object)"
            ) from None

    def vm_key(self, vm: str) -> bytes:
        return blake3.blake3(b"vm\0" + vm.encode(), key=self._index_key).digest()

    def vm_part(self, rps_key: bytes) -> bytes:
        return rps_key[:32]

    def seal_value(self, db: str, key: bytes, value: bytes) -> bytes:
        nonce = os.urandom(NONCE_BYTES)
        ad = self._index_ad + db.encode() + b"\0" + key
        return nonce + self._cipher().encrypt(nonce, value, ad)

    def open_value(self, db: str, key: bytes, value: bytes) -> bytes:
        from cryptography.exceptions import InvalidTag

        ad = self._index_ad + db.encode() + b"\0" + key
        try:
            return self._cipher().decrypt(
                bytes(value[:NONCE_BYTES]), bytes(value[NONCE_BYTES:]), ad
            )
        except (InvalidTag, ValueError):
            raise RepositoryError(
                f"the index's {db} entry does not authenticate (damaged or tampered with); "
                "run 'repofs rebuild-index'"
            ) from None


# -- configuration -------------------------------------------------------------------


@dataclass(frozen=True)
class EncryptionConfig:
    """The ``encryption`` object of a version-3 config.json; nothing secret."""

    cipher: str
    key: str  #: ``passphrase`` (wrapped in REPO/key) or ``key-file`` (outside the repository)
    key_id: str  #: 32 hex digits derived from the master key (:func:`key_id_of`)
    content_id: str  #: 32 hex digits bound into every seal; shared with future replicas

    def to_doc(self) -> dict[str, str]:
        return {
            "cipher": self.cipher,
            "key": self.key,
            "key_id": self.key_id,
            "content_id": self.content_id,
        }

    @classmethod
    def from_doc(cls, doc: Any, where: str) -> EncryptionConfig:
        if not isinstance(doc, dict):
            raise RepositoryError(f"{where}: encryption is not an object")
        values = {}
        for name in ("cipher", "key", "key_id", "content_id"):
            value = doc.get(name)
            if not isinstance(value, str):
                raise RepositoryError(f"{where}: encryption.{name} is missing or not a string")
            values[name] = value
        if values["cipher"] not in CIPHERS:
            raise RepositoryError(f"{where}: encryption.cipher {values['cipher']!r} is unknown")
        if values["key"] not in ("passphrase", "key-file"):
            raise RepositoryError(f"{where}: encryption.key {values['key']!r} is unknown")
        for name in ("key_id", "content_id"):
            if not _is_hex(values[name], 32):
                raise RepositoryError(f"{where}: encryption.{name} is not 32 hex digits")
        return cls(**values)


def _is_hex(text: str, n: int) -> bool:
    return len(text) == n and all(c in "0123456789abcdef" for c in text)


# -- key sources ----------------------------------------------------------------------


def set_sources(*, passphrase_file: str | None = None, key_file: str | None = None) -> None:
    """Record ``--passphrase-file`` and ``--key-file`` for this process and its children."""
    if passphrase_file is not None:
        os.environ[PASSPHRASE_FILE_ENV] = os.path.abspath(passphrase_file)
    if key_file is not None:
        os.environ[KEY_FILE_ENV] = os.path.abspath(key_file)


def key_file_source() -> str | None:
    return os.environ.get(KEY_FILE_ENV) or None


def read_small_file(path: str, what: str, error: type[RepofsError] = UsageError) -> bytes:
    """The first 64 KiB of a key, key file or passphrase file; a one-line error if unreadable.

    A pipe is fine (``--passphrase-file <(pass show backup)``): nothing here
    insists on a regular file, and none of these is larger than 64 KiB.
    """
    try:
        with open(path, "rb") as f:
            return f.read(65536)
    except OSError as exc:
        raise error(f"{path}: cannot read {what}: {exc.strerror}") from None


def _read_secret_file(path: str, what: str) -> bytes:
    data = read_small_file(path, f"the {what}")
    return data[:-1] if data.endswith(b"\n") else data


def passphrase(*, new: bool = False) -> bytes:
    """The passphrase from the first source there is; a one-line error if there is none.

    ``new`` asks for a new passphrase (``change-passphrase``): from
    ``REPOFS_NEW_PASSPHRASE`` or a prompt, typed twice.
    """
    if new:
        path = os.environ.get(NEW_PASSPHRASE_FILE_ENV)
        if path:
            return _nonempty(_read_secret_file(path, "new passphrase file"))
        value = os.environ.get(NEW_PASSPHRASE_ENV)
        if value is None:
            return _prompt(
                "new passphrase",
                confirm=True,
                missing="no new passphrase: set REPOFS_NEW_PASSPHRASE, pass "
                "--new-passphrase-file FILE or run on a terminal",
            )
        return _nonempty(value.encode())
    path = os.environ.get(PASSPHRASE_FILE_ENV)
    if path:
        return _nonempty(_read_secret_file(path, "passphrase file"))
    value = os.environ.get(PASSPHRASE_ENV)
    if value is not None:
        return _nonempty(value.encode())
    return _prompt("passphrase", confirm=False, missing=NO_SOURCE)


def new_repository_passphrase() -> bytes:
    """The passphrase of a new repository: as :func:`passphrase`, typed twice at a prompt."""
    if os.environ.get(PASSPHRASE_FILE_ENV) or os.environ.get(PASSPHRASE_ENV) is not None:
        return passphrase()
    return _prompt("passphrase for the new repository", confirm=True, missing=NO_SOURCE)


def _nonempty(value: bytes) -> bytes:
    if not value:
        raise UsageError("the passphrase is empty")
    return value


def _prompt(what: str, *, confirm: bool, missing: str) -> bytes:
    if not (sys.stdin.isatty() and sys.stderr.isatty()):
        raise UsageError(missing)
    try:
        first = getpass.getpass(f"repofs: {what}: ", stream=sys.stderr)
        if confirm and getpass.getpass(f"repofs: {what} again: ", stream=sys.stderr) != first:
            raise UsageError("the passphrases differ")
    except EOFError:
        raise UsageError(missing) from None
    return _nonempty(first.encode())


# -- wrapping the master key ----------------------------------------------------------


def kdf_params() -> dict[str, int]:
    return dict(ARGON2_TEST if os.environ.get(WEAK_KDF_ENV) else ARGON2_DEFAULT)


def _derive(secret: bytes, salt: bytes, params: dict[str, int]) -> bytes:
    from cryptography.hazmat.primitives.kdf.argon2 import Argon2id

    return Argon2id(
        salt=salt,
        length=32,
        iterations=params["iterations"],
        lanes=params["lanes"],
        memory_cost=params["memory_kib"],
    ).derive(secret)


def wrap(master: bytes, secret: bytes, repository_id: str) -> bytes:
    """REPO/key's content: the master key sealed under an Argon2id key of ``secret``."""
    params = kdf_params()
    salt = os.urandom(16)
    nonce = os.urandom(NONCE_BYTES)
    kek = _derive(secret, salt, params)
    wrapped = _aead("aes-256-gcm", kek).encrypt(
        nonce, master, WRAP_AD_TAG + bytes.fromhex(repository_id)
    )
    doc = {
        "format": "repofs-key",
        "version": 1,
        "repository_id": repository_id,
        "key_id": key_id_of(master),
        "kdf": {"name": "argon2id", "salt": salt.hex(), **params},
        "wrap": "aes-256-gcm",
        "nonce": nonce.hex(),
        "wrapped": wrapped.hex(),
    }
    return (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode()


def unwrap(blob: bytes, secret: bytes, repository_id: str, where: str) -> bytes:
    """The master key from REPO/key's content; a one-line error for a wrong passphrase."""
    from cryptography.exceptions import InvalidTag

    try:
        doc = json.loads(blob)
        kdf = doc["kdf"]
        if doc.get("format") != "repofs-key" or kdf.get("name") != "argon2id":
            raise ValueError("not a repofs key")
        params = {}
        for name, (low, high) in ARGON2_LIMITS.items():
            value = kdf[name]
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise ValueError(f"argon2id {name} {value!r} out of range")
            params[name] = value
        salt = bytes.fromhex(kdf["salt"])
        nonce = bytes.fromhex(doc["nonce"])
        wrapped = bytes.fromhex(doc["wrapped"])
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise RepositoryError(f"{where}: is not a repofs key file ({exc})") from None
    if doc.get("repository_id") != repository_id:
        raise UsageError(f"{where}: is the key of another repository")
    kek = _derive(secret, salt, params)
    try:
        return _aead("aes-256-gcm", kek).decrypt(
            nonce, wrapped, WRAP_AD_TAG + bytes.fromhex(repository_id)
        )
    except (InvalidTag, ValueError):
        raise UsageError("wrong passphrase") from None


def key_file_doc(master: bytes, enc: EncryptionConfig, repository_id: str) -> bytes:
    """An external key file's content: the master key itself (keep it like a private key)."""
    doc = {
        "format": "repofs-key-file",
        "version": 1,
        "repository_id": repository_id,
        "cipher": enc.cipher,
        "content_id": enc.content_id,
        "master": master.hex(),
    }
    return (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode()


def read_key_file(path: str, repository_id: str) -> bytes:
    """The master key in an external key file; a one-line error when it is not this one's."""
    raw = _read_secret_file(path, "key file")
    try:
        doc = json.loads(raw)
        if doc.get("format") != "repofs-key-file":
            raise ValueError("format")
        master = bytes.fromhex(doc["master"])
        if len(master) != MASTER_BYTES:
            raise ValueError("length")
    except (ValueError, KeyError, TypeError, AttributeError):
        raise UsageError(f"{path}: is not a repofs key file") from None
    if doc.get("repository_id") != repository_id:
        raise UsageError(f"{path}: is the key file of another repository")
    return master


def write_new_file(path: str, data: bytes) -> None:
    """Write a secret file that must not exist yet, owner-only, atomically."""
    if os.path.lexists(path):
        raise UsageError(f"{path}: exists; refusing to overwrite a key")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise UsageError(f"{parent}: directory does not exist")
    write_file_atomic(path, data, 0o600)


# -- opening ------------------------------------------------------------------------

_UNLOCKED: dict[tuple[str, str], SealedKeys] = {}
_UNLOCK_LOCK = threading.Lock()


def keys_for(path: str, enc: EncryptionConfig | None, repository_id: str) -> Keys:
    """The keys of the repository at ``path``: :data:`PLAIN`, or unlocked from a key source.

    Unlocking runs Argon2id once per process and repository; a forked mount
    daemon inherits what its parent unlocked (the prompt happens before the
    fork, while there is a terminal).
    """
    if enc is None:
        return PLAIN
    cache_key = (os.path.realpath(path), enc.key_id)
    with _UNLOCK_LOCK:
        keys = _UNLOCKED.get(cache_key)
        if keys is None:
            master = load_master(path, enc, repository_id)
            keys = _UNLOCKED[cache_key] = SealedKeys(master, enc.cipher, enc.content_id)
        return keys


@dataclass(frozen=True)
class NewKey:
    """What ``init`` chose for a new repository's encryption, before anything is written."""

    enc: EncryptionConfig | None  #: None: not encrypted
    master: bytes
    key_file: str | None  #: the key file to create, or None (a passphrase wraps the key)
    secret: bytes  #: the new passphrase (empty with a key file)

    def wrapped(self, repository_id: str) -> bytes | None:
        """The passphrase-wrapped key to store beside the repository, or None."""
        if self.enc is None or self.key_file is not None:
            return None
        return wrap(self.master, self.secret, repository_id)

    def keys(self) -> Keys | None:
        return (
            SealedKeys(self.master, self.enc.cipher, self.enc.content_id)
            if self.enc is not None
            else None
        )


def new_key(encryption: str, inside: Any = None) -> NewKey:
    """Pick the cipher, key source and master key of a new repository (asks for a passphrase).

    ``inside(path)`` tells whether a key file would lie inside the repository,
    which must be refused: whoever has the repository would have the key.
    """
    if encryption == "none":
        return NewKey(None, b"", None, b"")
    if encryption not in CIPHERS:
        raise UsageError(
            f"unknown encryption {encryption!r}: expected " + ", ".join(CIPHERS) + " or none"
        )
    key_file = key_file_source()
    if key_file is not None:
        if inside is not None and inside(key_file):
            raise UsageError(f"{key_file}: the key file must be outside the repository")
        if os.path.lexists(key_file):
            raise UsageError(f"{key_file}: exists; init writes a new key file")
    secret = b"" if key_file is not None else new_repository_passphrase()
    master = os.urandom(MASTER_BYTES)
    enc = EncryptionConfig(
        cipher=encryption,
        key="key-file" if key_file is not None else "passphrase",
        key_id=key_id_of(master),
        content_id=os.urandom(16).hex(),
    )
    return NewKey(enc, master, key_file, secret)


def keys_from_key_object(
    where: str, blob: bytes | None, enc: EncryptionConfig | None, repository_id: str
) -> Keys:
    """The keys of a repository whose wrapped key is ``blob`` (from a bucket), not a file.

    Same sources and checks as :func:`keys_for`; ``where`` names the
    repository in errors and in the per-process cache of unlocked keys.
    """
    if enc is None:
        return PLAIN
    cache_key = (where, enc.key_id)
    with _UNLOCK_LOCK:
        keys = _UNLOCKED.get(cache_key)
        if keys is not None:
            return keys
        if enc.key == "key-file":
            master = load_master(where, enc, repository_id)
        else:
            if blob is None:
                raise RepositoryError(
                    f"{where}/{KEY_FILE}: is missing; put an exported copy back with "
                    "'repofs key import'"
                )
            master = unwrap(blob, passphrase(), repository_id, f"{where}/{KEY_FILE}")
            if key_id_of(master) != enc.key_id:
                raise UsageError(f"{where}/{KEY_FILE}: holds another key than this repository's")
        keys = _UNLOCKED[cache_key] = SealedKeys(master, enc.cipher, enc.content_id)
        return keys


def load_master(path: str, enc: EncryptionConfig, repository_id: str) -> bytes:
    """The master key from the repository's key source, checked against its key id."""
    if enc.key == "key-file":
        source = key_file_source()
        if source is None:
            raise UsageError(
                "this repository is encrypted with a key file: pass --key-file FILE "
                "or set REPOFS_KEY_FILE"
            )
        master = read_key_file(source, repository_id)
        what = f"{source}: is not this repository's key file"
    else:
        key_path = os.path.join(path, KEY_FILE)
        if not os.path.lexists(key_path):
            raise RepositoryError(
                f"{key_path}: is missing; put an exported copy back with 'repofs key import'"
            )
        blob = read_small_file(key_path, "the repository key", RepositoryError)
        master = unwrap(blob, passphrase(), repository_id, key_path)
        what = f"{key_path}: holds another key than this repository's"
    if key_id_of(master) != enc.key_id:
        raise UsageError(what)
    return master


def forget_unlocked() -> None:
    """Drop the keys this process unlocked (after change-passphrase, and for tests)."""
    with _UNLOCK_LOCK:
        _UNLOCKED.clear()
