"""Process-wide settings that make PyTorch faster on a CPU.

PyTorch frees and re-allocates the same large activation buffers on every step. With glibc's
default malloc settings, blocks above 128 KiB are mapped from the system and unmapped again on
every free, and the top of the heap is given back as soon as 128 KiB of it is free, so each step
pays page faults and zeroed pages for memory it just released. :func:`tune_allocator` keeps blocks
of up to 32 MiB in the heap and gives back no less than 256 MiB at a time: data-free ``dm``
condensation made 1.7-1.8x the steps in the same wall-clock time on a 2-core machine, distillation
1.1-1.2x the rounds (``BENCHMARKS.md``, *Speed on a CPU*). The heavy entry points (``condense``, ``run_distill``, ``fit_supervised``
and the command line) call it; it is a no-op outside glibc, when the user set glibc's own
``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_``, or with ``DATAFREE_SYSTEM_MALLOC=1``.
"""
from __future__ import annotations

import ctypes
import os
import sys

OPT_OUT_ENV = "DATAFREE_SYSTEM_MALLOC"
MMAP_THRESHOLD = 32 << 20   # glibc's largest dynamic mmap threshold on 64-bit
TRIM_THRESHOLD = 256 << 20
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)
_applied: bool | None = None


def tune_allocator() -> bool:
    """Set glibc malloc's mmap and trim thresholds for this process, once; True when they are set.

    Example:
        >>> tune_allocator() in (True, False)
        True
    """
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    user_set = os.environ.get(OPT_OUT_ENV, "") not in ("", "0") or any(
        os.environ.get(name) for name in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"))
    if user_set or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)
        if not hasattr(libc, "gnu_get_libc_version"):  # musl and others: their own allocator rules
            return False
        _applied = bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    except (OSError, AttributeError):
        _applied = False
    return _applied
