"""LayerSpec(sinks=True): a learned logit per query head on GQA and MLA layers, windowed or not. The
model's attention equals the kernel reference, cached decode equals the uncached forward (≤ 1e-5),
and the cache holds no extra byte."""

from __future__ import annotations

import pytest
import torch

from kvforge.arch import CausalLM, LayerSpec, kv_cache_bytes
from kvforge.arch.memory import count_parameters
from tests.arch.test_cached_decode import TOL, _cached_logits
from tests.conftest import tiny_base, tiny_form

MLA_SIZES = dict(kv_lora_rank=24, qk_rope_head_dim=4, qk_nope_head_dim=8, v_head_dim=8)
PATTERNS = {
    "gqa": [LayerSpec("gqa", 2, sinks=True)],
    "gqa-window": [LayerSpec("gqa", 2, window=5, sinks=True)],
    "mla": [LayerSpec("mla", sinks=True)],
    "mla-window": [LayerSpec("mla", window=5, sinks=True)],
    "shared": [LayerSpec("gqa", 2, window=5, sinks=True), LayerSpec("gqa", window=5, kv_from=-1, sinks=True)],
}


def _model(name: str, **overrides) -> CausalLM:
    model = CausalLM(tiny_base(pattern=PATTERNS[name], **MLA_SIZES, **overrides)).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.sinks.normal_(0.0, 2.0)  # zero-init sinks are too gentle a test
    return model


@pytest.mark.parametrize("absorb", ["auto", "always", "never"])
@pytest.mark.parametrize("name", list(PATTERNS))
def test_sinks_cached_decode_matches_uncached_forward(name, absorb):
    model = _model(name, mla_absorb=absorb)
    ids = torch.randint(0, 97, (2, 17))
    with torch.no_grad():
        reference = model(ids)
        token_by_token = _cached_logits(model, ids, [1] * 17)
        blocks = _cached_logits(model, ids, [7, 3, 1, 6])
    assert (token_by_token - reference).abs().max().item() <= TOL
    assert (blocks - reference).abs().max().item() <= TOL


@pytest.mark.parametrize("name", ["gqa-window", "mla"])
def test_sinks_model_equals_the_eager_reference(name):  # flex and sdpa vs eager: tests/kernels
    ids = torch.randint(0, 97, (2, 12))
    model = _model(name)
    with torch.no_grad():
        reference = model(ids)
        for layer in model.model.layers:
            layer.self_attn.backend = "eager"
        torch.testing.assert_close(model(ids), reference, rtol=1e-5, atol=1e-5)


def test_sinks_change_the_output_and_cost_no_cache_bytes():
    ids = torch.randint(0, 97, (1, 12))
    with_sinks = _model("gqa-window")
    plain = CausalLM(tiny_base(pattern=[LayerSpec("gqa", 2, window=5)])).eval()
    state = {k: v for k, v in with_sinks.state_dict().items() if not k.endswith("sinks")}
    plain.load_state_dict(state)
    with torch.no_grad():
        assert (with_sinks(ids) - plain(ids)).abs().max() > 1e-3
        for layer in with_sinks.model.layers:
            layer.self_attn.sinks.fill_(-1e4)  # a sink nobody attends to is no sink
        torch.testing.assert_close(with_sinks(ids), plain(ids), rtol=1e-5, atol=1e-5)
    for config in (with_sinks.config, plain.config):
        assert with_sinks.new_cache(2, 16).nbytes() == kv_cache_bytes(config, 16, torch.float32, batch=2)


def test_sinks_have_gpt_oss_names_train_and_are_counted():
    model = _model("mla")
    assert "model.layers.0.self_attn.sinks" in model.state_dict()
    assert model.model.layers[0].self_attn.sinks.shape == (8,)
    assert count_parameters(model.config) == model.num_parameters()
    model.train()
    model.loss(torch.randint(0, 97, (2, 10)), torch.randint(0, 97, (2, 10))).backward()
    assert model.model.layers[0].self_attn.sinks.grad.abs().sum() > 0


def test_fresh_model_sinks_start_at_zero():
    model = CausalLM(tiny_form("sinks"))
    sinks = [layer.self_attn.sinks for layer in model.model.layers]
    assert all(torch.equal(s, torch.zeros(8)) for s in sinks)
