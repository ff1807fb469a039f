"""Keep freed host memory in the process instead of handing it back to the OS (CPU training speed).

Why: PyTorch's CPU allocator is plain ``malloc``. glibc serves large blocks (over a threshold that only grows
to 32 MiB) with ``mmap`` and returns them with ``munmap`` on free, and trims the heap top beyond
``M_TRIM_THRESHOLD``. A training step allocates and frees the same activation-sized blocks every step, so every
step faults its working set in again: on the f2 preset (2 × 256 tokens) we counted ~345,000 minor page faults
per step (1.3 GiB of fresh pages) and the step took 4.57 s; with the two thresholds raised, 0 faults and
3.02 s (``bench/results/cpu_speed_2026-11-23.md``). GPU allocators cache for the same reason; jemalloc or
tcmalloc via ``LD_PRELOAD`` also fix it, this needs no extra library.

The cost: the process keeps its peak heap (freed blocks are reused, not returned). It is applied only when
training on CPU (``trainer.keep_host_memory``, default on) and only with glibc on Linux; elsewhere it is a no-op
that says so.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

# mallopt parameter numbers from glibc's <malloc.h>
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3
_INT_MAX = 2**31 - 1


def keep_freed_host_memory() -> bool:
    """Raise glibc's trim and mmap thresholds to the maximum; True if glibc accepted both."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
        gnu_get_libc_version = libc.gnu_get_libc_version  # only glibc has it
    except (OSError, AttributeError):
        log.debug("host allocator: not glibc, freed memory handling left as is")
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    gnu_get_libc_version.restype = ctypes.c_char_p
    ok = bool(mallopt(_M_TRIM_THRESHOLD, _INT_MAX)) and bool(mallopt(_M_MMAP_THRESHOLD, _INT_MAX))
    mallopt(_M_TOP_PAD, 64 << 20)  # grow the heap in 64 MiB steps (fewer brk calls); best effort
    log.debug("host allocator: glibc %s keeps freed memory (mallopt %s)", gnu_get_libc_version().decode(),
             "accepted" if ok else "refused")
    return ok
