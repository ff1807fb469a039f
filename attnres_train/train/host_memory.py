"""Keep freed host memory in the process instead of handing it back to the OS (CPU training speed).

Why: glibc serves and frees large blocks with ``mmap``/``munmap`` and trims the heap, so every CPU step faults
its working set in again (f2 preset: ~345,000 page faults and 4.6 s per step -> none and 3.0 s;
``bench/results/cpu_speed_2026-11-23.md``). Raising the two thresholds keeps the blocks; the process then
keeps its peak heap. CPU training only (``trainer.keep_host_memory``, default on), glibc on Linux only;
elsewhere a no-op that says so. docs/training.md, "The pieces".
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
    log.debug(
        "host allocator: glibc %s keeps freed memory (mallopt %s)",
        gnu_get_libc_version().decode(),
        "accepted" if ok else "refused",
    )
    return ok
