"""Gemma's building blocks equal transformers' bit for bit in bf16 (where rounding order matters), and
the Gemma fields of ModelConfig are validated with errors naming the field and what is allowed."""

from __future__ import annotations

import pytest
import torch
from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm, Gemma3TextScaledWordEmbedding

from kvforge.arch import CausalLM, ModelConfig
from kvforge.arch.layers import RMSNorm
from kvforge.arch.model import embedding_multiplier
from tests.conftest import GEMMA3_TRAITS


def test_unit_offset_rmsnorm_equals_gemma3_rmsnorm_bit_for_bit_in_bf16():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(4, 7, 48, generator=generator).to(torch.bfloat16)
    weight = torch.randn(48, generator=generator).to(torch.bfloat16)
    ours, theirs = RMSNorm(48, 1e-6, unit_offset=True), Gemma3RMSNorm(48, eps=1e-6)
    with torch.no_grad():
        ours.weight.copy_(weight)
        theirs.weight.copy_(weight)
    assert torch.equal(ours.to(torch.bfloat16)(x), theirs.to(torch.bfloat16)(x))


def test_embedding_scale_is_rounded_to_the_weight_dtype_as_transformers_does():
    theirs = Gemma3TextScaledWordEmbedding(11, 3072, None, embed_scale=3072**0.5).to(torch.bfloat16)
    ids = torch.arange(11).unsqueeze(0)
    with torch.no_grad():
        expected = theirs(ids)
        actual = torch.nn.functional.embedding(ids, theirs.weight) * embedding_multiplier(
            3072, torch.bfloat16
        )
    assert embedding_multiplier(3072, torch.bfloat16) == 55.5  # not sqrt(3072) = 55.4256
    assert torch.equal(actual, expected)


def test_unit_offset_norms_start_at_zero_so_a_fresh_model_scales_by_one():
    config = ModelConfig(
        vocab_size=32, d_model=16, n_layers=2, n_heads=2, norm_unit_offset=True, sandwich_norms=True
    )
    norms = [p for name, p in CausalLM(config).named_parameters() if name.endswith("norm.weight")]
    assert len(norms) == 2 * 4 + 1 and all(bool((p == 0).all()) for p in norms)


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        (
            {"mlp_activation": "relu"},
            r"mlp_activation='relu': allowed values are \['silu', 'gelu_pytorch_tanh', 'gelu'\]",
        ),
        ({"attn_logit_softcap": 0.0}, r"attn_logit_softcap=0.0: must be positive or None"),
        ({"final_logit_softcap": -1.0}, r"final_logit_softcap=-1.0: must be positive or None"),
        ({"query_pre_attn_scalar": 0}, r"query_pre_attn_scalar=0: must be positive or None"),
        (
            {
                "window_rope_theta": 1e4,
                "pattern": [{"attention": "mla", "window": 4}],
                "kv_lora_rank": 8,
                "qk_rope_head_dim": 4,
            },
            r"window_rope_theta=10000.0: layer 0 slides but is 'mla'",
        ),
        (
            {
                "attn_logit_softcap": 5.0,
                "pattern": [{"attention": "mla"}],
                "kv_lora_rank": 8,
                "qk_rope_head_dim": 4,
            },
            r"attn_logit_softcap=5.0: layer 0 is 'mla', whose attention does not implement it",
        ),
    ],
)
def test_bad_gemma_fields_are_clear_errors(changes, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig(vocab_size=32, d_model=16, n_layers=2, n_heads=2, **changes)


def test_activation_estimate_counts_sandwich_norms_within_20_percent_of_measured():
    """Gemma 3's recipe (no soft-cap: on CPU a capped model runs eager attention, which saves the score
    matrix the estimate assumes fused kernels never store)."""
    from kvforge.arch.memory import estimate_training_memory
    from tests.arch.test_memory import _saved_activation_bytes

    config = ModelConfig(
        vocab_size=64, d_model=128, n_layers=4, n_heads=8, max_seq_len=512, ffn_dim=352, **GEMMA3_TRAITS
    )
    measured = _saved_activation_bytes(CausalLM(config), torch.randint(0, 64, (2, 257)))
    estimate = estimate_training_memory(config, batch=2, seq_len=256).activations
    assert 0.8 * measured <= estimate <= 1.2 * measured
