"""The training process's host allocator (glibc): ``trim`` (the default), ``pinned`` or ``default``.

Left alone (``default``), glibc raises its mmap threshold after the first large free, so later tensors of
that size come from its heap, which it keeps after they are freed: a 0.27B bf16-mixed run on CPU then holds
0.6-0.9 GiB per rank more than it uses, 15-20 % above ``MemoryCheck``'s estimate on two FSDP2 ranks.
``trim`` leaves the threshold alone and calls ``malloc_trim(0)`` three times a training step (``release``:
at its start, the first after setup and loading, after its forward and after its backward pass): what was
freed since leaves the process, while allocations in between reuse the heap. At 0.27B that keeps the peak
within 8 % of the estimate for about 1.0-1.1x the CPU seconds of a step. ``pinned`` fixes the threshold
(``mallopt``): every buffer of at least 128 KiB is its own mapping, returned when freed; it keeps the peak
lowest (-4 %) but the kernel faults in and zeroes each new mapping, 1.4-1.5x the CPU seconds of a step.
Both apply on GPU hosts too, where the host holds the loading, the one-time conversion and checkpoint
staging while the step's tensors are CUDA memory (so there is little to trim or fault). Measured:
docs/results.md, "What the host allocator costs".
"""

from __future__ import annotations

import os

from kvforge.conversion.host import ENVIRONMENT, malloc_trim, on_glibc, pin_mmap_threshold

HOST_ALLOCATORS = ("pinned", "trim", "default")
DEFAULT_HOST_ALLOCATOR = "trim"


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
