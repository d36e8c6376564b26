"""Keep freed tensors' memory in glibc's heap while an explanation runs (Linux with glibc, CPU tensors).

Why: PyTorch's CPU tensors come from ``malloc``. glibc serves a block above its mmap threshold (dynamic,
at most 32 MiB) with a fresh ``mmap`` and gives it back to the system when it is freed, so every new tensor
of that size faults its pages in again: about 2 µs per 4 KiB page on a virtual machine. The backward over
the n·M rows allocates and frees such tensors at every rule site, and on EfficientNet-B0 at 224×224 the
faults were 55 % of an explanation's CPU time (docs/torch.md, "Speed on CPU: the allocator").

What: :func:`hold_freed_memory` raises the mmap threshold to 1 GiB and turns trimming off for the duration
of an explanation (``mallopt``), so freed blocks are reused, then gives the free memory back
(``malloc_trim``) and leaves the thresholds at the ceiling glibc's own dynamic thresholds reach (32 MiB
mmap, 64 MiB trim). Nothing is done where the user already chose: another allocator preloaded
(jemalloc, tcmalloc, mimalloc) or glibc's malloc settings in the environment (``MALLOC_*_``,
``GLIBC_TUNABLES``), or off glibc.
"""

from __future__ import annotations

import ctypes
import os
import sys
import threading
from contextlib import contextmanager

#: mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
#: while an explanation runs: blocks up to 1 GiB from the heap, freed memory kept
HOLD = ((M_MMAP_THRESHOLD, 1 << 30), (M_TRIM_THRESHOLD, 2**31 - 1))
#: afterwards: glibc's dynamic thresholds at their 64-bit ceiling (DEFAULT_MMAP_THRESHOLD_MAX, trim = 2×)
RELEASE = ((M_MMAP_THRESHOLD, 32 << 20), (M_TRIM_THRESHOLD, 64 << 20))
#: below this many bytes per temporary glibc's dynamic threshold already keeps blocks in the heap
MIN_HOLD_BYTES = 32 << 20

_USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")
_OTHER_ALLOCATORS = ("jemalloc", "tcmalloc", "mimalloc")


def _glibc():
    """glibc's handle when this process's malloc is glibc's and the user has not tuned it, else None."""
    if not sys.platform.startswith("linux"):
        return None
    if any(k in os.environ for k in _USER_SETTINGS) or "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        return None
    if any(a in os.environ.get("LD_PRELOAD", "") for a in _OTHER_ALLOCATORS):
        return None
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version   # glibc only (musl has no such symbol)
        libc.mallopt.argtypes, libc.malloc_trim.argtypes = [ctypes.c_int, ctypes.c_int], [ctypes.c_size_t]
    except (OSError, AttributeError):
        return None
    return libc


class _Holder:
    """Process-wide and re-entrant: the settings change on the first entry and are released on the last."""

    def __init__(self):
        self.lock, self.depth, self.libc, self.probed = threading.Lock(), 0, None, False

    def enter(self) -> bool:
        with self.lock:
            if not self.probed:
                self.libc, self.probed = _glibc(), True
            if self.libc is None:
                return False
            if self.depth == 0:
                for param, value in HOLD:
                    self.libc.mallopt(param, value)
            self.depth += 1
            return True

    def exit(self):
        with self.lock:
            self.depth -= 1
            if self.depth == 0:
                for param, value in RELEASE:
                    self.libc.mallopt(param, value)
                self.libc.malloc_trim(0)


_HOLDER = _Holder()


@contextmanager
def hold_freed_memory(enabled: bool = True):
    """Within the block, freed CPU tensors' memory is reused instead of returned to the system (see the
    module docstring); yields whether the setting is in effect."""
    active = enabled and _HOLDER.enter()
    try:
        yield active
    finally:
        if active:
            _HOLDER.exit()
