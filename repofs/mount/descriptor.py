"""The monolithicFlat VMDK descriptor shown beside each flat disk file.

The extent is declared ``RW`` although the mount is read-only: qemu ignores
``RDONLY`` extents, and hypervisors that boot from it use snapshot or
linked-clone overlays anyway.  The CID is derived from the restore point and
disk, so it is stable across mounts and differs between restore points.
"""

from __future__ import annotations

from repofs.store.records import digest_of


def geometry(capacity: int) -> tuple[int, int, int]:
    """BIOS geometry as VMware computes it for SCSI disks (255 heads, 63 sectors)."""
    sectors = capacity // 512
    heads, spt = 255, 63
    cylinders = max(1, min(sectors // (heads * spt), 65535))
    return cylinders, heads, spt


def descriptor_text(vm: str, rp_id: str, disk: str, capacity: int) -> bytes:
    cid = digest_of(f"{vm}\0{rp_id}\0{disk}".encode()).hex()[:8]
    cyl, heads, spt = geometry(capacity)
    flat = f"{disk}-flat.vmdk".replace('"', '\\"')
    return (
        "# Disk DescriptorFile\n"
        "version=1\n"
        f"CID={cid}\n"
        "parentCID=ffffffff\n"
        'createType="monolithicFlat"\n'
        "\n"
        "# Extent description\n"
        f'RW {capacity // 512} FLAT "{flat}" 0\n'
        "\n"
        "# The Disk Data Base\n"
        "#DDB\n"
        "\n"
        'ddb.virtualHWVersion = "4"\n'
        f'ddb.geometry.cylinders = "{cyl}"\n'
        f'ddb.geometry.heads = "{heads}"\n'
        f'ddb.geometry.sectors = "{spt}"\n'
        'ddb.adapterType = "lsilogic"\n'
        f'ddb.uuid.image = "{_uuid(cid, vm, rp_id, disk)}"\n'
    ).encode()


def _uuid(cid: str, vm: str, rp_id: str, disk: str) -> str:
    h = digest_of(f"uuid\0{vm}\0{rp_id}\0{disk}".encode())[:16]
    return " ".join(f"{b:02x}" for b in h[:8]) + "-" + " ".join(f"{b:02x}" for b in h[8:])
