"""MLA: the absorbed computation (attention over the latent) equals the expanded one."""

from __future__ import annotations

import pytest
import torch

from kvforge.arch import CausalLM, KVView
from tests.conftest import tiny_form


def test_a_query_bias_decodes_with_the_cache_as_without():
    """``mla_q_bias`` (a Qwen2 query bias through to_mla): the absorbed decode reads the biased query too."""
    config = tiny_form("mla", mla_q_bias=True)
    model = CausalLM(config).eval()
    assert model.model.layers[0].self_attn.q_proj.bias is not None
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.bias.normal_()
        ids = torch.randint(0, config.vocab_size, (1, 12))
        full = model(ids)
        cache = model.new_cache(1, 12, torch.float32)
        steps = torch.cat([model(ids[:, t : t + 1], cache=cache) for t in range(12)], dim=1)
    assert (steps - full).abs().max().item() < 1e-4


@pytest.mark.parametrize("rope_heads", [1, 2, 8])
@pytest.mark.parametrize("q_lora_rank", [None, 16])
def test_absorbed_attention_equals_expanded(rope_heads, q_lora_rank):
    config = tiny_form("mla", mla_rope_heads=rope_heads, q_lora_rank=q_lora_rank)
    attn = CausalLM(config).model.layers[0].self_attn
    q_nope = torch.randn(2, 3, 8, config.qk_nope_head_dim)
    q_pe = torch.randn(2, 3, 8, config.qk_rope_head_dim)
    latent = torch.randn(2, 11, attn.cache_features()[0][0])
    for window in (None, 4):
        kv = KVView((latent,), causal=True, window=window)
        expanded = attn.expanded(q_nope, q_pe, kv)
        absorbed = attn.absorbed(q_nope, q_pe, kv)
        assert (expanded - absorbed).abs().max().item() < 1e-5


def test_absorbed_decode_is_what_auto_mode_uses_with_a_cache():
    attn = CausalLM(tiny_form("mla")).model.layers[0].self_attn
    assert attn.use_absorbed(q_len=1, cached=True)
    assert not attn.use_absorbed(q_len=1, cached=False)
    assert not attn.use_absorbed(q_len=64, cached=True)


def test_mla_parameter_names_are_deepseek_v3_names():
    config = tiny_form("mla", q_lora_rank=16)
    names = {name for name, _ in CausalLM(config).named_parameters() if ".layers.0.self_attn." in name}
    assert names == {
        f"model.layers.0.self_attn.{leaf}.weight"
        for leaf in (
            "q_a_proj",
            "q_a_layernorm",
            "q_b_proj",
            "kv_a_proj_with_mqa",
            "kv_a_layernorm",
            "kv_b_proj",
            "o_proj",
        )
    }


def test_shared_layers_have_no_kv_projections():
    names = {name for name, _ in CausalLM(tiny_form("mix")).named_parameters()}
    assert "model.layers.2.self_attn.k_proj.weight" not in names
    assert "model.layers.1.self_attn.k_proj.weight" in names
    assert "model.layers.3.self_attn.kv_a_proj_with_mqa.weight" not in names
    assert "model.layers.3.self_attn.kv_b_proj.weight" in names  # its own up-projection of the shared latent
