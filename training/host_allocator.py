"""The training process's host allocator: by default glibc's mmap threshold is pinned (``mallopt``).

Left alone, glibc raises its mmap threshold after the first large free, so later tensors of that size
come from its heap, which it keeps after they are freed: a 0.27B run on CPU then holds about 0.6 GiB per
rank more than it uses, above ``MemoryCheck``'s estimate (docs/results.md). Pinned, every buffer of at
least 128 KiB is its own mapping, returned when freed. The price is the kernel faulting in and zeroing each
new mapping: 1.4-1.5x the CPU seconds of a CPU training step at 0.27B (docs/results.md). Applied on GPU
hosts too: there the host holds the loading, the one-time conversion and checkpoint staging while the
step's tensors are CUDA memory, so it pays few faults. ``host_allocator: default`` leaves glibc as it is.
"""

from __future__ import annotations

import os

from kvforge.conversion.host import ENVIRONMENT, pin_mmap_threshold

HOST_ALLOCATORS = ("pinned", "default")


class HostAllocator:
    """The setting, applied at most once per process. A module pickled into a rank that Lightning spawns
    arrives with its parent's state, so ``apply`` compares process ids rather than trusting a flag."""

    def __init__(self, mode: str = "pinned") -> None:
        if mode not in HOST_ALLOCATORS:
            raise ValueError(f"host_allocator={mode!r}: must be one of {list(HOST_ALLOCATORS)}")
        self.mode = mode
        self._pid: int | None = None
        self._pinned = False

    def apply(self) -> None:
        if self.mode == "pinned" and self._pid != os.getpid():
            self._pid, self._pinned = os.getpid(), pin_mmap_threshold()

    @property
    def state(self) -> str:
        """In this process: ``pinned`` (by ``apply``), ``environment`` (``MALLOC_MMAP_THRESHOLD_`` set: glibc
        applied the user's value at start-up) or ``default`` (switched off, not glibc, or not applied yet)."""
        if ENVIRONMENT in os.environ:
            return "environment"
        return "pinned" if self._pid == os.getpid() and self._pinned else "default"
