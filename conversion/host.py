"""The host process: its threads for small dense math, and its memory (freed large buffers go back to the OS).

``one_cpu_thread()``: the per-layer fits (eigh, Cholesky, solves, SVDs of a few thousand rows) are too
small for more than one thread; on shared cores the extra threads mostly spin-wait, costing 10-40x
the CPU time for little or no wall time. The forward passes over the calibration tokens keep every thread.

The memory (glibc only):

glibc serves an allocation of at least ``M_MMAP_THRESHOLD`` bytes with its own ``mmap``, unmapped on
free; smaller ones come from the heap, which it keeps. The threshold starts at 128 KiB but glibc raises
it to the size of any mmapped block that is freed (up to 32 MiB), so after the first large tensor is
freed, every later tensor of that size lands on the heap and stays resident after it is freed: a
layer-by-layer conversion or a training step then holds the high-water mark of everything it ever
freed. Setting the threshold explicitly (``mallopt``) turns that adjustment off. It is what the
``MALLOC_MMAP_THRESHOLD_`` environment variable does, but it works in a process that has already started.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import logging
import os
import sys
from collections.abc import Iterator

import torch

log = logging.getLogger(__name__)

M_MMAP_THRESHOLD = -3  # from glibc's malloc.h
DEFAULT_THRESHOLD = 128 * 1024
ENVIRONMENT = "MALLOC_MMAP_THRESHOLD_"


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version.restype = ctypes.c_char_p
        libc.gnu_get_libc_version()  # musl and others do not have it
    except (OSError, AttributeError):
        return None
    return libc


def pin_mmap_threshold(threshold: int = DEFAULT_THRESHOLD) -> bool:
    """Serve allocations of at least ``threshold`` bytes with mmap from now on, so freeing them gives
    the memory back. Returns whether the setting is in force. A no-op (False) off glibc, and when
    ``MALLOC_MMAP_THRESHOLD_`` is set (the user's choice wins, and glibc has already applied it)."""
    if threshold <= 0:
        raise ValueError(f"pin_mmap_threshold: threshold={threshold} must be a positive number of bytes")
    if ENVIRONMENT in os.environ:
        return False
    libc = _glibc()
    if libc is None:
        return False
    done = bool(libc.mallopt(M_MMAP_THRESHOLD, ctypes.c_int(threshold)))
    if done:
        log.debug("glibc mmap threshold pinned at %d bytes", threshold)
    return done


@contextlib.contextmanager
def one_cpu_thread(enabled: bool = True) -> Iterator[None]:
    """Run the block with ``torch.set_num_threads(1)``, restoring the previous count after (also when
    it raises). ``enabled=False`` changes nothing (the math runs on a GPU, where host threads idle)."""
    if not enabled:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
