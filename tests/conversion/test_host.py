"""The host allocator settings: with the mmap threshold pinned, or after ``malloc_trim``, freed tensors
leave the process; left alone, glibc keeps them."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

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


@pytest.fixture
def two_threads():
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(previous)


def test_one_cpu_thread_sets_one_and_restores(two_threads):
    with host.one_cpu_thread():
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2


def test_one_cpu_thread_restores_after_an_exception(two_threads):
    with pytest.raises(RuntimeError, match="inside"), host.one_cpu_thread():
        raise RuntimeError("inside")
    assert torch.get_num_threads() == 2


def test_one_cpu_thread_disabled_changes_nothing(two_threads):
    with host.one_cpu_thread(enabled=False):
        assert torch.get_num_threads() == 2


def test_one_cpu_thread_gives_the_same_fit(two_threads):
    """The per-layer fits' kind of math (Gram, eigh, solve in fp64) agrees to round-off (1e-10 relative)."""
    x = torch.randn(512, 96, dtype=torch.float64, generator=torch.Generator().manual_seed(0))

    def fit() -> tuple[torch.Tensor, torch.Tensor]:
        gram = x.mT @ x / len(x)
        return torch.linalg.eigvalsh(gram), torch.linalg.solve(gram, x.mT @ x[:, :8])

    threaded = fit()
    with host.one_cpu_thread():
        single = fit()
    for a, b in zip(threaded, single):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_convert_checkpoint_pins_the_threshold_first(monkeypatch, tmp_path):
    from kvforge.conversion import convert
    from tests.conftest import shared_path

    calls = []
    monkeypatch.setattr(convert, "pin_mmap_threshold", lambda **kw: calls.append(kw) or True)
    convert.convert_checkpoint(
        shared_path("stories260K"), tmp_path / "out", "gqa", {"n_kv_heads": 2, "method": "mean"}, device="cpu"
    )
    assert calls == [{"unless_settled": True}]  # a training run's own host_allocator setting stands


def test_a_settled_choice_stands_against_later_library_pins(monkeypatch):
    """A training run chooses first (trim's 4 MiB, or glibc's own threshold); its one-time conversion in
    the same process must not re-pin at 128 KiB."""
    pins = []
    monkeypatch.setattr(host, "_settled", None)
    monkeypatch.setattr(
        host, "_glibc", lambda: type("libc", (), {"mallopt": lambda _, t: pins.append(t.value) or 1})
    )
    monkeypatch.delenv(host.ENVIRONMENT, raising=False)
    assert host.pin_mmap_threshold(4 << 20)
    assert host.pin_mmap_threshold(unless_settled=True) and pins == [4 << 20]
    host.keep_glibc_threshold()
    assert host.pin_mmap_threshold(unless_settled=True) is False and pins == [4 << 20]
    assert host.pin_mmap_threshold() and pins == [
        4 << 20,
        host.DEFAULT_THRESHOLD,
    ]  # an explicit pin still works


def test_self_calibration_samples_on_one_thread_on_the_host(monkeypatch, tmp_path, two_threads):
    from kvforge.conversion import convert, transforms
    from tests.conftest import shared_path

    sample = transforms.sample_calibration_ids
    threads = []

    def recording(*args, **kwargs):
        threads.append(torch.get_num_threads())
        return sample(*args, **kwargs)

    monkeypatch.setattr(transforms, "sample_calibration_ids", recording)
    convert.convert_checkpoint(
        shared_path("stories260K"),
        tmp_path / "out",
        "gqa",
        {"n_kv_heads": 2},
        device="cpu",
        calib_tokens=64,
        calib_seq_len=32,
    )
    assert threads == [1] and torch.get_num_threads() == 2
