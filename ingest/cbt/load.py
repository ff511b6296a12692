"""Loading a ``--cbt`` changed-block list: a qemu dirty bitmap or a JSON file.

Apart from :mod:`ingest.cbt.blocks` so that the loaders import the model and
the model imports no loader: the arrows run one way.
"""

from __future__ import annotations

from ingest.cbt.blocks import QEMU_BITMAP_PREFIX, ChangedBlocks
from repofs.errors import SourceError


def load_changed_blocks(spec: str, capacity: int, source_path: str | None) -> ChangedBlocks:
    """Load the changed-block list ``spec`` for a disk of ``capacity`` bytes.

    ``spec`` is either ``qemu-bitmap:NAME`` (a persistent dirty bitmap of the
    qcow2 image or NBD export ``source_path``) or the path of a JSON file in
    the repofs or the VMware ``QueryChangedDiskAreas`` form, told apart by
    their keys.  A JSON file whose name starts with ``qemu-bitmap:`` can be
    given as ``./qemu-bitmap:...``.  Every problem with the list is a
    one-line :class:`SourceError` naming the file.
    """
    if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 0:
        raise ValueError(f"capacity must be a non-negative integer, not {capacity!r}")
    if spec.startswith(QEMU_BITMAP_PREFIX):
        from ingest.cbt.qemu import load_qemu_bitmap

        name = spec[len(QEMU_BITMAP_PREFIX) :]
        if not name:
            raise SourceError(f"{spec}: no bitmap name after {QEMU_BITMAP_PREFIX!r}")
        if source_path is None:
            raise SourceError(f"{spec}: a qemu bitmap needs a qcow2 source or an NBD URI")
        return load_qemu_bitmap(name, capacity, source_path)
    from ingest.cbt.jsonfile import load_json_changed_blocks

    return load_json_changed_blocks(spec, capacity)
