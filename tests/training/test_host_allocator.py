"""Every training process pins glibc's mmap threshold before it reads weights (``host_allocator``), a
rank that receives the module pickled pins it again in its own process, and ``host_allocator: default``
leaves the allocator alone. (That the pinned threshold gives freed tensors back: tests/conversion/test_host.py.)"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys

import lightning.pytorch as pl
import pytest

from kvforge.conversion import host
from kvforge.training import host_allocator
from kvforge.training.host_allocator import HostAllocator
from tests.training.helpers import tiny_corpus, tiny_data, tiny_module, trainer


class StateAtSetup(pl.Callback):
    """The module's allocator state when the callbacks' ``setup`` runs: before the model is built."""

    def setup(self, trainer, pl_module, stage) -> None:
        self.state = pl_module.host_allocator.state


@pytest.fixture
def spy(monkeypatch):
    """Records each ``pin_mmap_threshold`` call instead of changing this test process's allocator."""
    calls = []
    monkeypatch.delenv(host.ENVIRONMENT, raising=False)
    monkeypatch.setattr(host_allocator, "pin_mmap_threshold", lambda: calls.append(os.getpid()) or True)
    return calls


def _fit(tmp_path, **options) -> str:
    recorder = StateAtSetup()
    data = tiny_data(tiny_corpus(tmp_path), tmp_path / "cache")
    trainer(tmp_path, 1, callbacks=[recorder]).fit(tiny_module(**options), datamodule=data)
    return recorder.state


def test_a_training_process_pins_the_threshold_before_the_model_is_built(tmp_path, spy):
    assert _fit(tmp_path) == "pinned"
    assert spy == [os.getpid()]  # once per process, however many hooks ask


def test_host_allocator_default_leaves_glibc_alone(tmp_path, spy):
    assert _fit(tmp_path, host_allocator="default") == "default"
    assert spy == []


@pytest.mark.skipif(host._glibc() is None, reason="the setting is glibc's")
def test_the_real_setting_is_reported_pinned(monkeypatch):
    monkeypatch.delenv(host.ENVIRONMENT, raising=False)
    allocator = HostAllocator()
    assert allocator.state == "default"
    allocator.apply()
    assert allocator.state == "pinned"


def test_the_environment_variable_is_reported_and_wins(monkeypatch, spy):
    monkeypatch.setenv(host.ENVIRONMENT, "65536")
    allocator = HostAllocator()
    allocator.apply()
    assert allocator.state == "environment"


PICKLED_INTO_A_NEW_PROCESS = """
import pickle, sys
from kvforge.training import host_allocator
host_allocator.pin_mmap_threshold = lambda: True
allocator = pickle.loads(sys.stdin.buffer.read())
before = allocator.state
allocator.apply()
print(before, allocator.state)
"""


def test_a_rank_that_receives_the_module_pickled_pins_again(spy):
    allocator = HostAllocator()
    allocator.apply()
    assert allocator.state == "pinned"
    env = {k: v for k, v in os.environ.items() if k != host.ENVIRONMENT}
    result = subprocess.run(
        [sys.executable, "-c", PICKLED_INTO_A_NEW_PROCESS],
        input=pickle.dumps(allocator),
        capture_output=True,
        env=env,
        check=True,
    )
    assert result.stdout.decode().split() == ["default", "pinned"]


def test_an_unknown_host_allocator_is_a_clear_error():
    with pytest.raises(
        ValueError, match=r"host_allocator='tcmalloc': must be one of \['pinned', 'default'\]"
    ):
        tiny_module(host_allocator="tcmalloc")
