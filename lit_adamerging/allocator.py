"""Keep freed heap memory in the process (Linux, glibc), so a CPU training loop stops faulting pages back in.

By default glibc gives the top of its heap back to the kernel as soon as more than a few tens of
MB are free there, and serves large allocations with fresh ``mmap`` s. A training step that frees
hundreds of MB at its end (an AdaMerging step frees the merged weights and their gradients, about
two copies of the encoder) then gets them back from the kernel next step as new zero-filled pages:
on a ViT-B/32 x 8 tasks CPU step, ~70,000 page faults and ~0.12 s of a 3 s step. Raising the
trim and mmap thresholds keeps that memory in the process for reuse; the peak is unchanged.

:func:`retain_freed_memory` is process-wide, so the library's own entry points call it (the
``lit-adamerging`` CLI and the benchmarks in :mod:`lit_adamerging.benchmarks`); a script that
builds its own Trainer may call it once at start.
Setting ``MALLOC_TRIM_THRESHOLD_`` / ``MALLOC_MMAP_THRESHOLD_`` or preloading jemalloc or tcmalloc
has the same effect.
"""

from __future__ import annotations

import ctypes
import platform

_M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
_M_MMAP_THRESHOLD = -3
_INT_MAX = 2**31 - 1


def retain_freed_memory(mmap_threshold_bytes: int = 32 << 20) -> bool:
    """Make glibc keep freed memory for reuse and serve allocations below ``mmap_threshold_bytes`` from its heap.

    Returns whether the settings took effect: ``False`` where the C library is not glibc (macOS,
    Windows, musl) or refuses the threshold (glibc may cap it; 32 MB is accepted); nothing changes then.
    """
    if mmap_threshold_bytes <= 0:
        raise ValueError(f"mmap_threshold_bytes must be positive, got {mmap_threshold_bytes}.")
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(None)  # the running process's symbols, glibc's mallopt among them
    # The mmap threshold first: fixing the trim threshold alone would stop glibc's own adaptation of it.
    if not libc.mallopt(_M_MMAP_THRESHOLD, min(mmap_threshold_bytes, _INT_MAX)):
        return False
    return bool(libc.mallopt(_M_TRIM_THRESHOLD, _INT_MAX))
