"""The host process: its threads for small dense math, and its memory (freed large buffers go back to the OS).

``one_cpu_thread()``: the per-layer fits (eigh, Cholesky, solves, SVDs of a few thousand rows) are too
small for more than one thread; on shared cores the extra threads mostly spin-wait, costing CPU time
for little or no wall time (docs/results.md, "One CPU thread for small fits and for sampling"). The
forward passes over the calibration tokens keep every thread.

The memory (glibc only):

glibc serves an allocation of at least ``M_MMAP_THRESHOLD`` bytes with its own ``mmap``, unmapped on
free; smaller ones come from the heap, which it keeps. The threshold starts at 128 KiB but glibc raises
it to the size of any mmapped block that is freed (up to 32 MiB), so after the first large tensor is
freed, every later tensor of that size lands on the heap and stays resident after it is freed: a
layer-by-layer conversion or a training step then holds the high-water mark of everything it ever
freed. Setting the threshold explicitly (``mallopt``) turns that adjustment off. It is what the
``MALLOC_MMAP_THRESHOLD_`` environment variable does, but it works in a process that has already started.
The cheaper alternative leaves the threshold alone and calls ``malloc_trim`` now and then: it gives back
every free page of glibc's heaps (their top, and since glibc 2.8 whole free pages inside them too), so
memory freed before the call leaves, while allocations between calls reuse the heap without faulting.

``HostAllocator``: the training process's setting, ``trim`` (the default), ``pinned`` or ``default``.

Left alone (``default``), glibc raises its mmap threshold after the first large free, so later tensors of
that size come from its heap, which it keeps after they are freed: a training run then holds noticeably
more than it uses. ``trim`` fixes the threshold at 4 MiB (``mallopt``: buffers of at least 4 MiB are their
own mappings, given back when freed) and calls ``malloc_trim(0)`` three times a training step
(``release``: at its start, the first after setup and loading, after its forward and after its backward
pass): the smaller buffers freed since leave the process too, while the allocations in between reuse the
heap. ``pinned`` fixes the threshold at 128 KiB: every larger buffer is its own mapping, returned when
freed; the peak is lowest but the kernel faults in and zeroes each new mapping. Both apply on GPU hosts
too, where the host holds the loading, the one-time conversion and checkpoint staging while the step's
tensors are CUDA memory (so there is little to trim or fault). What each costs: docs/results.md, "The
host allocator settings".
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


def on_glibc() -> bool:
    """Whether this process's C library is glibc (the only one these settings apply to)."""
    return _glibc() is not None


_settled: int | None = None  # this process's choice: a pinned threshold, 0 = glibc's own; None = not made


def pin_mmap_threshold(threshold: int = DEFAULT_THRESHOLD, *, unless_settled: bool = False) -> bool:
    """Serve allocations of at least ``threshold`` bytes with mmap from now on, so freeing them gives
    the memory back. Returns whether a pinned threshold is in force. A no-op (False) off glibc, and when
    ``MALLOC_MMAP_THRESHOLD_`` is set (the user's choice wins, and glibc has already applied it).
    ``unless_settled``: keep whatever this process already chose (a training run's ``host_allocator``,
    including :func:`keep_glibc_threshold`): what a library step such as a conversion asks for."""
    global _settled
    if threshold <= 0:
        raise ValueError(f"pin_mmap_threshold: threshold={threshold} must be a positive number of bytes")
    if unless_settled and _settled is not None:
        return _settled > 0
    if ENVIRONMENT in os.environ:
        return False
    libc = _glibc()
    if libc is None:
        return False
    done = bool(libc.mallopt(M_MMAP_THRESHOLD, ctypes.c_int(threshold)))
    if done:
        _settled = threshold
        log.debug("glibc mmap threshold pinned at %d bytes", threshold)
    return done


def keep_glibc_threshold() -> None:
    """Settle on glibc's own (dynamic) threshold: later ``pin_mmap_threshold(unless_settled=True)`` calls
    leave it alone."""
    global _settled
    _settled = 0


def malloc_trim(pad: int = 0) -> bool:
    """Give the free pages of every glibc heap (arena) back to the OS, keeping ``pad`` bytes at each heap's
    top. Returns whether any memory was released. A no-op (False) off glibc."""
    if pad < 0:
        raise ValueError(f"malloc_trim: pad={pad} must be a number of bytes >= 0")
    libc = _glibc()
    if libc is None:
        return False
    released = bool(libc.malloc_trim(ctypes.c_size_t(pad)))
    log.debug("malloc_trim(%d): %s", pad, "released memory" if released else "nothing to release")
    return released


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


# ---------------------------------------------------------------------------------------------- training
HOST_ALLOCATORS = ("pinned", "trim", "default")
DEFAULT_HOST_ALLOCATOR = "trim"
TRIM_THRESHOLD = 4 * 1024 * 1024  # ``trim``'s mmap threshold: the largest buffers leave at once


class HostAllocator:
    """The setting, applied at most once per process. A module pickled into a rank that Lightning spawns
    arrives with its parent's state, so ``apply`` compares process ids rather than trusting a flag."""

    def __init__(self, mode: str = DEFAULT_HOST_ALLOCATOR) -> None:
        if mode not in HOST_ALLOCATORS:
            raise ValueError(f"host_allocator={mode!r}: must be one of {list(HOST_ALLOCATORS)}")
        self.mode = mode
        self._pid: int | None = None
        self._active = False

    def apply(self) -> None:
        if self._pid == os.getpid():
            return
        self._pid = os.getpid()
        if self.mode == "default":  # also for the one-time conversion in this process (no pin there)
            keep_glibc_threshold()
            return
        self._active = pin_mmap_threshold(TRIM_THRESHOLD if self.mode == "trim" else DEFAULT_THRESHOLD)

    def release(self) -> None:
        """Called at the start of every training step, after its forward and after its backward pass: under
        ``trim``, give the heaps' free pages back (``malloc_trim(0)``)."""
        if self.mode == "trim":
            self.apply()
            malloc_trim(0)

    @property
    def state(self) -> str:
        """In this process: ``pinned`` or ``trim`` (by ``apply``), ``environment`` (``MALLOC_MMAP_THRESHOLD_``
        set: glibc applied the user's value at start-up; ``trim`` still trims) or ``default`` (switched off,
        not glibc, or not applied yet)."""
        if ENVIRONMENT in os.environ:
            return "environment"
        return self.mode if self._pid == os.getpid() and self._active else "default"
