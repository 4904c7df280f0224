"""The training process's host allocator (glibc): ``pinned`` (the default), ``trim`` or ``default``.

Left alone, glibc raises its mmap threshold after the first large free, so later tensors of that size
come from its heap, which it keeps after they are freed: a 0.27B run on CPU then holds 0.6-0.9 GiB per
rank more than it uses, above ``MemoryCheck``'s estimate (docs/results.md). ``pinned`` fixes the threshold
(``mallopt``): every buffer of at least 128 KiB is its own mapping, returned when freed; the price is the
kernel faulting in and zeroing each new mapping, 1.4-1.5x the CPU seconds of a CPU training step at 0.27B.
``trim`` leaves the threshold alone and calls ``malloc_trim(0)`` at the start of every training step
(``step``), after setup and loading for the first: what the previous step freed leaves the process, while
a step's own allocations reuse the heap and fault once per step at most. Both apply on GPU hosts too:
there the host holds the loading, the one-time conversion and checkpoint staging while the step's tensors
are CUDA memory, so they cost little. ``default`` leaves glibc as it is. Measured trade: docs/results.md.
"""

from __future__ import annotations

import os

from kvforge.conversion.host import ENVIRONMENT, malloc_trim, on_glibc, pin_mmap_threshold

HOST_ALLOCATORS = ("pinned", "trim", "default")
DEFAULT_HOST_ALLOCATOR = "pinned"


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
        if self.mode == "default" or self._pid == os.getpid():
            return
        self._pid = os.getpid()
        self._active = pin_mmap_threshold() if self.mode == "pinned" else on_glibc()

    def release(self) -> None:
        """Called at the start of every training step, after its forward and after its backward pass: under
        ``trim``, give the heaps' free pages back."""
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
