"""Keeping freed memory in the process for the two long, allocation-heavy jobs.

Ingest and the mount daemon allocate and free megabytes per request
(4 MiB read batches, 1 MiB replies, 64 KiB chunks).  glibc hands large
blocks back to the kernel on free and takes fresh pages again on the next
allocation; every fresh page is a page fault, and on virtual machines that
return freed memory to the host (free page reporting) also a host fault:
measured on the benchmark VM, 1 GB/s for first touches, and 217,000 faults
(850 MB) in one 2.2 GiB ingest.  Fixed thresholds keep the freed blocks
for reuse: the same ingest took 25,000 faults.
"""

from __future__ import annotations

import contextlib
import ctypes

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 1024 * 1024  # glibc's maximum: every batch and reply comes from the heap
TRIM_THRESHOLD = 256 * 1024 * 1024  # free memory at the heap top kept before trimming


def keep_freed_memory(trim_threshold: int = TRIM_THRESHOLD) -> bool:
    """Tune glibc's malloc as above; False (and no change) on another C library.

    ``trim_threshold`` is about the most freed memory kept: part of the
    process's RSS bound.
    """
    with contextlib.suppress(OSError, AttributeError, TypeError):
        libc = ctypes.CDLL("libc.so.6")  # glibc's soname; find_library would spawn ldconfig
        mallopt = libc.mallopt
        mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        return bool(
            mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) and mallopt(M_TRIM_THRESHOLD, trim_threshold)
        )
    return False
