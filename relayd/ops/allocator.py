"""Giving freed memory back to the system (glibc only; elsewhere these do nothing).

A relay's large buffers (frames of up to a few hundred KB, backlog pages)
come and go. glibc raises its mmap threshold each time such a block is
freed, after which blocks of that size come from the heap and stay in the
process when freed: RSS would never come back down after a burst.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger("relayd.daemon")

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 128 * 1024


def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        libc = ctypes.CDLL(name)
        libc.mallopt, libc.malloc_trim  # glibc has both
    except (OSError, AttributeError):
        return None
    return libc


_LIBC = _libc()


def tune_allocator() -> bool:
    """Fix glibc's mmap threshold at 128 KiB, so large buffers always go back to the system when freed."""
    if _LIBC is None:
        return False
    return bool(_LIBC.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(_LIBC.mallopt(M_TRIM_THRESHOLD,
                                                                                          MMAP_THRESHOLD))


def release_free_memory() -> None:
    """Return free heap pages to the system (``malloc_trim``); cheap enough for a periodic timer."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)
