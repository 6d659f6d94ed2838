"""Process-level runtime tuning for the command-line entry points (not for library use).

:func:`tune_malloc` keeps glibc's allocator from handing large blocks back to the kernel.

Why: a frame network's edge tensors are (B, N, N, C) float32 arrays of 10-50 MB at batch 10 x length
100. glibc serves blocks above its mmap threshold (128 KiB, adapted upwards to at most 32 MiB) with a
fresh ``mmap`` and gives them back with ``munmap`` when freed. Every forward pass then maps, page-faults
in (one fault per 4 KiB page) and unmaps hundreds of MB. On the 2-core CPU box the plain
``generate_backbones`` job took 52 million minor page faults and spent a third of its CPU time in the
kernel (docs/benchmarks.md). Raising the mmap threshold and the trim threshold lets freed blocks stay in
the heap and be reused by the next forward pass. Results are unchanged (only where memory comes from).

Only the CLIs call this: it changes the allocator of the whole process, which a library should not do
behind its caller's back. Set ``SUPERDIFF_NO_MALLOPT=1`` to turn it off; it is also skipped when the
user has set glibc's own knobs (``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``,
``GLIBC_TUNABLES`` with a malloc entry), on non-Linux systems and on other C libraries (musl).
"""
from __future__ import annotations

import ctypes
import os
import platform
import sys

__all__ = ["tune_malloc"]

# glibc <malloc.h> parameter numbers
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

# blocks below this come from the heap and are reused; larger ones are still mmapped (their page
# faults are negligible next to the work done on them)
_MMAP_THRESHOLD = 1 << 30
# glibc's documented maximum mmap threshold on 64-bit systems (older glibc rejects larger values)
_MMAP_THRESHOLD_FALLBACK = 32 << 20
# free memory at the top of the heap is returned to the kernel only above this
_TRIM_THRESHOLD = 1 << 30

_done: bool | None = None


def _user_set_malloc_knobs() -> bool:
    if "MALLOC_MMAP_THRESHOLD_" in os.environ or "MALLOC_TRIM_THRESHOLD_" in os.environ:
        return True
    return "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", "")


def tune_malloc() -> bool:
    """Raise glibc's mmap and trim thresholds so large freed blocks are reused, not unmapped.

    Idempotent; returns True when the settings were applied (now or by an earlier call), False when
    skipped (disabled by ``SUPERDIFF_NO_MALLOPT=1``, user-set malloc knobs, not glibc/Linux, or
    ``mallopt`` unavailable or refusing). Never raises.
    """
    global _done
    if _done is not None:
        return _done
    _done = False
    if os.environ.get("SUPERDIFF_NO_MALLOPT", "").strip() not in ("", "0"):
        return False
    if not sys.platform.startswith("linux") or _user_set_malloc_knobs():
        return False
    try:
        if platform.libc_ver()[0] != "glibc":
            return False
        mallopt = ctypes.CDLL("libc.so.6").mallopt
        mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        mallopt.restype = ctypes.c_int
        ok = mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD) or mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_FALLBACK)
        if not ok:
            return False
        _done = bool(mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD))
    except (OSError, AttributeError, ValueError):
        return False
    return _done
