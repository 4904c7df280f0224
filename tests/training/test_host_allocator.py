"""Every training process sets up its host allocator before it reads weights (``host_allocator``): ``trim``
(the default) pins glibc's mmap threshold at 4 MiB and gives the heaps' free pages back at the start of
every step, after its forward and after its backward pass, ``pinned`` pins glibc's mmap threshold, a rank that receives the module pickled applies the
setting again in its own process, and ``default`` leaves the allocator alone. (That both settings give freed tensors back: tests/conversion/test_host.py.)"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys

import lightning.pytorch as pl
import pytest

from kvforge.conversion import host
from kvforge.conversion import host as host_allocator
from kvforge.conversion.host import HostAllocator
from tests.training.helpers import tiny_corpus, tiny_data, tiny_module, trainer

STEPS = 3


class Recorder(pl.Callback):
    """The module's allocator state when the callbacks' ``setup`` runs (before the model is built), and
    the allocator calls made before each step's backward pass (callbacks' hooks run before the module's)
    and by the end of each step."""

    def __init__(self, calls: list) -> None:
        self.calls, self.before_backward, self.step_end = calls, [], []

    def setup(self, trainer, pl_module, stage) -> None:
        self.state = pl_module.host_allocator.state

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        self.before_backward.append(len(self.calls))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.step_end.append(len(self.calls))


@pytest.fixture
def spy(monkeypatch):
    """Records each ``pin_mmap_threshold`` and ``malloc_trim`` call instead of changing this test
    process's allocator."""
    calls = []
    monkeypatch.delenv(host.ENVIRONMENT, raising=False)
    monkeypatch.setattr(
        host_allocator, "pin_mmap_threshold", lambda threshold: calls.append(f"pin({threshold})") or True
    )
    monkeypatch.setattr(host_allocator, "malloc_trim", lambda pad: calls.append(f"trim({pad})") or True)
    return calls


def _fit(tmp_path, calls, **options) -> Recorder:
    recorder = Recorder(calls)
    data = tiny_data(tiny_corpus(tmp_path), tmp_path / "cache")
    trainer(tmp_path, STEPS, callbacks=[recorder]).fit(tiny_module(**options), datamodule=data)
    return recorder


def test_host_allocator_pinned_pins_the_threshold_before_the_model_is_built(tmp_path, spy):
    assert _fit(tmp_path, spy, host_allocator="pinned").state == "pinned"
    assert spy == ["pin(131072)"]  # once per process, however many hooks ask; never a trim


def test_a_training_process_trims_three_times_a_step_by_default(tmp_path, spy):
    recorder = _fit(tmp_path, spy)
    assert recorder.state == "trim"
    # the threshold at 4 MiB once per process, then before the forward pass (the first after setup and
    # loading), after it and after the backward pass
    assert spy == [f"pin({4 * 2**20})"] + ["trim(0)"] * 3 * STEPS
    assert recorder.before_backward == [3 * step + 2 for step in range(STEPS)]
    assert recorder.step_end == [3 * (step + 1) + 1 for step in range(STEPS)]


def test_host_allocator_default_leaves_glibc_alone(tmp_path, spy):
    assert _fit(tmp_path, spy, host_allocator="default").state == "default"
    assert spy == []


@pytest.mark.skipif(not host.on_glibc(), reason="the settings are glibc's")
@pytest.mark.parametrize("mode", ["pinned", "trim"])
def test_the_real_setting_is_reported(monkeypatch, mode):
    monkeypatch.delenv(host.ENVIRONMENT, raising=False)
    allocator = HostAllocator(mode)
    assert allocator.state == "default"
    allocator.apply()
    allocator.release()
    assert allocator.state == mode


def test_the_environment_variable_is_reported_and_wins(monkeypatch, spy):
    monkeypatch.setenv(host.ENVIRONMENT, "65536")
    for mode in ("pinned", "trim"):
        allocator = HostAllocator(mode)
        allocator.apply()
        assert allocator.state == "environment"


PICKLED_INTO_A_NEW_PROCESS = """
import pickle, sys
from kvforge.conversion import host as host_allocator
host_allocator.pin_mmap_threshold = lambda threshold: True
allocator = pickle.loads(sys.stdin.buffer.read())
before = allocator.state
allocator.apply()
print(before, allocator.state)
"""


@pytest.mark.parametrize("mode", ["pinned", "trim"])
def test_a_rank_that_receives_the_module_pickled_applies_it_again(spy, mode):
    allocator = HostAllocator(mode)
    allocator.apply()
    assert allocator.state == mode
    env = {k: v for k, v in os.environ.items() if k != host.ENVIRONMENT}
    result = subprocess.run(
        [sys.executable, "-c", PICKLED_INTO_A_NEW_PROCESS],
        input=pickle.dumps(allocator),
        capture_output=True,
        env=env,
        check=True,
    )
    assert result.stdout.decode().split() == ["default", mode]


def test_an_unknown_host_allocator_is_a_clear_error():
    with pytest.raises(
        ValueError, match=r"host_allocator='tcmalloc': must be one of \['pinned', 'trim', 'default'\]"
    ):
        tiny_module(host_allocator="tcmalloc")
