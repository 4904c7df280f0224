"""Training tests run tiny models: one intra-op thread is faster than several (no synchronisation),
and it keeps results independent of the machine's core count."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
