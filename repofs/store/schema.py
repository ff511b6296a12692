"""The byte layout of the LMDB index: table names, key builders and value codecs.

One module owns it so that a reader (or a format change) finds every key and
value of the index in one place; :mod:`repofs.store.index` keeps the
environment, transactions, map growth and padding, and every other module
goes through the functions here.  ``docs/format.md`` ("The LMDB index")
mirrors this table.

Databases (all keys and values are bytes; integers big-endian so that LMDB's
byte order is numeric order):

``meta``
    ``b"seq"`` -> u64, the next sequence number.  Sequence numbers name VMs
    and restore points for inode numbers; they are never reused.
    ``b"gcgen"`` -> u64, the gc generation: how many times gc has condemned
    objects (absent: 0).
    ``b"revived"`` -> u64, how many commits brought condemned objects back.
    ``b"whole" + NUL + seq (u64)`` -> empty: the restore point of that
    sequence number had every object it references indexed when it
    committed (see :meth:`repofs.store.repository.Repository.known_whole`).
``objects``
    ``type (1 byte) + BLAKE3 digest (32)`` -> ``pack id (16) + offset (u64) +
    stored length (u32) + raw length (u32)``.  The offset is that of the
    record header.  An entry exists only once its pack is durable.
``packs``
    ``pack id (16)`` -> ``size (u64) + record count (u32)`` of every published pack.
``vms``
    ``VM name`` -> ``sequence number (u64)``.  Kept after the VM's last
    restore point is pruned, so its directory keeps its inode.
``rps``
    ``VM name + NUL + restore point id`` -> the restore point's JSON.  Sorted
    by VM, then by time, because ids are UTC times.
``reservations``
    same key -> JSON ``{"seq", "pid", "started", "gen"}``: an id and sequence
    number taken by an ingest that has not committed yet, and the gc
    generation it started in (absent in older ones: 0).  A crashed ingest
    leaves one behind; gc drops it once its process is gone.
``leases``
    8 random bytes -> JSON ``{"pid", "started", "gen", "what"}``: a writer
    other than an ingest (prune's tombstones) that may publish a pack
    before indexing it.  gc deletes nothing such a writer could still use.
``condemned``
    object key (as in ``objects``) -> ``location (as in objects) + gc
    generation (u64)``: objects that gc found dead and took out of
    ``objects``, so nothing new deduplicates against them.  An ingest that
    was running when they were condemned brings those it references back
    in its commit; a later gc forgets the rest (see ``docs/maintenance.md``).
``doomed``
    ``pack id (16)`` -> ``size (u64) + record count (u32) + gc generation
    (u64)``: packs that gc
    took out of ``packs`` (nothing live in them) or found unindexed; their
    files are deleted once no writer that was running at that generation
    is left.
``seqs``
    ``sequence number (u64)`` -> ``b"V" + VM name`` or ``b"R" + rps key``,
    the way back from an inode number to what it names.

Only in the cache of a repository in a bucket (``docs/object-storage.md``):

``applied``
    bucket object name (``log/...``, ``checkpoints/...``) -> empty: the log
    objects this cache has applied.
``buried``
    ``rps key + commit nonce (16)`` -> sealed JSON ``{"vm", "id", "nonce"}``:
    restore points a prune or delete removed, never shown again.
``retired``
    ``pack id (16)`` -> empty: packs gc deleted; nothing is indexed in them again.
``locs``
    ``object key (33) + pack id (16)`` -> ``offset (u64) + stored (u32) + raw (u32)``:
    every location of every object; ``objects`` and ``condemned`` are derived
    from it (the smallest live pack id wins, so every host agrees).
``flags``
    ``rps key`` -> the newest PROTECTION body for that restore point.
"""

from __future__ import annotations

import json
import struct
from typing import Any, NamedTuple

from repofs.store.records import RecordType

DATABASES = (
    "meta",
    "objects",
    "packs",
    "vms",
    "rps",
    "reservations",
    "seqs",
    "leases",
    "condemned",
    "doomed",
    "applied",
    "buried",
    "retired",
    "flags",
    "locs",
)

_U64 = struct.Struct(">Q")
_LOCATION = struct.Struct(">16sQII")
_RAW_LEN = struct.Struct(">I")  # the last field of _LOCATION
_PACK_INFO = struct.Struct(">QI")
_CONDEMNED = struct.Struct(">16sQIIQ")  #: a Location, then the gc generation
_DOOMED = struct.Struct(">QIQ")  #: pack size, record count (as in packs), gc generation
assert _LOCATION.size + _U64.size == _CONDEMNED.size and _LOCATION.format.endswith("I")

#: Keys in ``meta``.
SEQ_KEY = b"seq"
GC_GENERATION_KEY = b"gcgen"
REVIVALS_KEY = b"revived"
_WHOLE_PREFIX = b"whole\0"

_SEQ_VM = b"V"
_SEQ_RP = b"R"


class Location(NamedTuple):
    """Where an object's record lies; a tuple because a sequential read makes thousands."""

    pack_id: bytes
    offset: int
    stored_len: int
    raw_len: int


class SeqTarget(NamedTuple):
    """What a sequence number names: a VM (``rp_id`` None) or one of its restore points."""

    vm: str
    rp_id: str | None


# -- keys -----------------------------------------------------------------------


def object_key(rtype: RecordType, digest: bytes) -> bytes:
    return bytes((rtype,)) + digest


def type_prefix(rtype: RecordType) -> bytes:
    """What every ``objects`` key of this type starts with (``prefix + digest`` is its key)."""
    return bytes((rtype,))


def key_type(key: bytes) -> int:
    """The record type of an ``objects`` (or ``condemned``) key."""
    return key[0]


def key_digest(key: bytes) -> bytes:
    """The digest of an ``objects`` (or ``condemned``) key."""
    return key[1:]


def rp_key(vm: str, rp_id: str) -> bytes:
    return vm.encode() + b"\0" + rp_id.encode()


def split_rp_key(key: bytes) -> tuple[str, str]:
    vm, _, rp = key.partition(b"\0")
    return vm.decode(), rp.decode()


def vm_prefix(vm: str) -> bytes:
    """What the ``rps`` (and ``reservations``) keys of one VM start with."""
    return vm.encode() + b"\0"


def vm_prefix_end(vm: str) -> bytes:
    """The first key past every ``rps`` key of ``vm``."""
    return vm.encode() + b"\x01"


def vm_of_rp_key(key: bytes) -> str:
    """The VM an ``rps`` key belongs to."""
    return key.partition(b"\0")[0].decode()


def vm_key(vm: str) -> bytes:
    return vm.encode()


def seq_key(seq: int) -> bytes:
    return _U64.pack(seq)


def whole_key(seq: int) -> bytes:
    """The ``meta`` key that marks the restore point ``seq`` whole since its commit."""
    return _WHOLE_PREFIX + _U64.pack(seq)


# -- values ---------------------------------------------------------------------


def encode_u64(n: int) -> bytes:
    return _U64.pack(n)


def decode_u64(raw: bytes | None, default: int = 0) -> int:
    """A u64 value (``meta`` counters, ``vms``); ``default`` when absent."""
    return _U64.unpack(raw)[0] if raw else default


def encode_location(pack_id: bytes, offset: int, stored_len: int, raw_len: int) -> bytes:
    return _LOCATION.pack(pack_id, offset, stored_len, raw_len)


def decode_location(raw: bytes) -> Location:
    return Location(*_LOCATION.unpack(raw))


#: ``objects`` value -> its fields as a plain tuple, for loops over millions of entries.
location_fields = _LOCATION.unpack


def location_pack_id(raw: bytes) -> bytes:
    """The pack an ``objects`` (or ``condemned``) value points into, without decoding the rest."""
    return raw[:16]


def raw_len_suffix(raw_len: int) -> bytes:
    """The bytes an ``objects`` value ends with when its object is ``raw_len`` bytes long."""
    return _RAW_LEN.pack(raw_len)


def encode_pack_info(size: int, count: int) -> bytes:
    return _PACK_INFO.pack(size, count)


def decode_pack_info(raw: bytes) -> tuple[int, int]:
    """``packs`` value -> (size, record count)."""
    size, count = _PACK_INFO.unpack(raw)
    return size, count


def encode_condemned(location: bytes, gen: int) -> bytes:
    """A ``condemned`` value: the object's ``objects`` value, then the gc generation."""
    return location + _U64.pack(gen)


def decode_condemned(raw: bytes) -> tuple[Location, int]:
    """``condemned`` value -> (where the object lay, gc generation)."""
    *loc, gen = _CONDEMNED.unpack(raw)
    return Location(*loc), gen


def condemned_generation(raw: bytes) -> int:
    return _U64.unpack(raw[-_U64.size :])[0]


def encode_doomed(size: int, count: int, gen: int) -> bytes:
    return _DOOMED.pack(size, count, gen)


def decode_doomed(raw: bytes) -> tuple[int, int, int]:
    """``doomed`` value -> (size, record count (0: never indexed), gc generation)."""
    size, count, gen = _DOOMED.unpack(raw)
    return size, count, gen


def encode_rp(doc: dict[str, Any]) -> bytes:
    """An ``rps`` value: the restore point's JSON, keys sorted."""
    return json.dumps(doc, sort_keys=True).encode()


def decode_rp(raw: bytes) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(raw)
    return doc


def encode_writer(doc: dict[str, Any]) -> bytes:
    """A ``reservations`` or ``leases`` value: the writer's JSON."""
    return json.dumps(doc).encode()


def decode_writer(raw: bytes) -> dict[str, Any]:
    """A ``reservations`` or ``leases`` value; raises ValueError if it is not JSON."""
    doc: dict[str, Any] = json.loads(raw)
    return doc


def seq_target_vm(vm: str) -> bytes:
    return _SEQ_VM + vm.encode()


def seq_target_rp(vm: str, rp_id: str) -> bytes:
    return _SEQ_RP + rp_key(vm, rp_id)


def decode_seq_target(raw: bytes) -> SeqTarget:
    """A ``seqs`` value -> the VM, or the VM and restore point id, it names."""
    if raw.startswith(_SEQ_RP):
        vm, rp_id = split_rp_key(raw[1:])
        return SeqTarget(vm, rp_id)
    return SeqTarget(raw[1:].decode(), None)
