"""The host allocator settings: with the mmap threshold pinned, or after ``malloc_trim``, freed tensors
leave the process; left alone, glibc keeps them."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from kvforge.conversion import host

PROBE = """
import sys, psutil, torch
from kvforge.conversion.host import malloc_trim, pin_mmap_threshold
pinned = pin_mmap_threshold() if sys.argv[1] == "pin" else False
rss = lambda: psutil.Process().memory_info().rss / 2**20
big = torch.ones(1 << 21)  # 8 MiB, mmapped; freeing it makes glibc raise its threshold to 8 MiB
del big
base = rss()
blocks = [torch.ones(1 << 19) for _ in range(64)]  # 64 x 2 MiB, from the heap unless pinned
fence = torch.ones(1 << 19)  # keeps the heap's top in use, so the freed blocks cannot be trimmed
del blocks
released = malloc_trim(0) if sys.argv[1] == "trim" else False
print(pinned or released, round(rss() - base))
"""

glibc_only = pytest.mark.skipif(host._glibc() is None, reason="the setting is glibc's")


def _retained(mode: str) -> tuple[str, int]:
    env = {k: v for k, v in os.environ.items() if k != host.ENVIRONMENT}
    out = subprocess.run(
        [sys.executable, "-c", PROBE, mode], capture_output=True, text=True, env=env, check=True
    ).stdout.split()
    return out[0], int(out[1])


@glibc_only
def test_pinned_threshold_gives_freed_tensors_back():
    pinned, retained = _retained("pin")
    default_pinned, default_retained = _retained("default")
    assert (pinned, default_pinned) == ("True", "False")
    assert default_retained > 96, (
        "the probe no longer shows glibc's retention; it cannot tell the setting works"
    )
    assert retained < 16, f"{retained} MiB of 128 MiB freed stayed resident with the threshold pinned"


@glibc_only
def test_malloc_trim_gives_back_free_pages_inside_the_heap():
    released, retained = _retained("trim")
    _, default_retained = _retained("default")
    assert released == "True"
    assert default_retained > 96, "the probe no longer shows glibc's retention; it cannot tell the trim works"
    assert retained < 16, f"{retained} MiB of 128 MiB freed stayed resident after malloc_trim"


def test_environment_variable_wins(monkeypatch):
    monkeypatch.setenv(host.ENVIRONMENT, "65536")
    assert host.pin_mmap_threshold() is False


def test_bad_threshold_is_a_clear_error():
    with pytest.raises(ValueError, match="threshold=0"):
        host.pin_mmap_threshold(0)


def test_bad_trim_pad_is_a_clear_error():
    with pytest.raises(ValueError, match="pad=-1"):
        host.malloc_trim(-1)
