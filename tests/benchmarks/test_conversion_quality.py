"""benchmarks/conversion_quality.py scores stock exports through the same windowed loss as kvforge."""

from __future__ import annotations

import pytest
import torch

from benchmarks.conversion_quality import stock_loss
from kvforge.arch import CausalLM
from kvforge.arch.evaluate import windowed_nll
from kvforge.conversion import load_pretrained
from tests.conftest import shared_path


def test_stock_loss_of_an_unchanged_export_equals_kvforges():
    source = load_pretrained(shared_path("stories260K"))
    ids = torch.randint(
        0, source.config.vocab_size, (3 * 128 + 1,), generator=torch.Generator().manual_seed(0)
    )
    model = CausalLM(source.config)
    model.load_state_dict(source.state_dict)
    ours = windowed_nll(model.eval(), ids).mean  # 512-token windows, as stock_loss scores
    theirs, architecture = stock_loss(source.config, source.state_dict, ids, shared_path("stories260K"))
    assert architecture == "LlamaForCausalLM"
    assert theirs == pytest.approx(ours, abs=1e-4)
