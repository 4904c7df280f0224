"""The stock transformers models the benchmarks measure beside kvforge are the same models: with the
same weights they produce the same logits (so a speed ratio compares like with like)."""

from __future__ import annotations

import pytest
import torch

from benchmarks.gpu_models import Shape
from benchmarks.stock import build_stock
from kvforge.arch import CausalLM


@pytest.mark.parametrize(
    ("form", "stock_class"), [("gqa", "LlamaForCausalLM"), ("mla", "DeepseekV3ForCausalLM")]
)
def test_stock_twin_with_the_same_weights_gives_the_same_logits(form, stock_class):
    config = Shape(smoke=True, max_seq_len=64, window=16).config(form)
    ours = CausalLM(config).eval()
    theirs = build_stock(config).eval()
    assert type(theirs).__name__ == stock_class
    theirs.load_state_dict(ours.state_dict())
    ids = torch.randint(0, config.vocab_size, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), theirs(ids).logits, rtol=1e-4, atol=1e-4)
