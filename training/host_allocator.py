"""The training process's host allocator (glibc): ``trim`` (the default), ``pinned`` or ``default``.

Left alone (``default``), glibc raises its mmap threshold after the first large free, so later tensors of
that size come from its heap, which it keeps after they are freed: a 0.27B bf16-mixed run on CPU then holds
0.6-0.9 GiB per rank more than it uses, 15-20 % above ``MemoryCheck``'s estimate on two FSDP2 ranks.
``trim`` fixes the threshold at 4 MiB (``mallopt``: buffers of at least 4 MiB are their own mappings, given
back when freed) and calls ``malloc_trim(0)`` three times a training step (``release``: at its start, the
first after setup and loading, after its forward and after its backward pass): the smaller buffers freed
since leave the process too, while the allocations in between reuse the heap. At 0.27B on two FSDP2 ranks
that holds the peak at 0.98-0.99x the estimate over 5 steps for 1.1-1.2x the CPU seconds of a step (the
trims alone: 1.11x the estimate, creeping up step by step; the 4 MiB threshold alone: 1.10 in one
process). ``pinned`` fixes the threshold at 128 KiB: every larger buffer is its own mapping, returned when
freed; the peak is lowest (0.96x) but the kernel faults in and zeroes each new mapping, 1.3-1.5x the CPU
seconds of a step.
Both apply on GPU hosts too, where the host holds the loading, the one-time conversion and checkpoint
staging while the step's tensors are CUDA memory (so there is little to trim or fault). Measured:
docs/results.md, "What the host allocator costs".
"""

from __future__ import annotations

import os

from kvforge.conversion.host import (
    DEFAULT_THRESHOLD,
    ENVIRONMENT,
    keep_glibc_threshold,
    malloc_trim,
    pin_mmap_threshold,
)

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
