"""flops_per_token: the documented formula, checked by hand on tiny configs of each form."""

from __future__ import annotations

import pytest
from torch import nn

from kvforge.arch import CausalLM, LayerSpec, ModelConfig, flops_per_token, forward_flops_per_token
from tests.conftest import tiny_base

TINY = dict(vocab_size=10, d_model=4, n_layers=1, n_heads=2, head_dim=2, ffn_dim=6)


def test_gqa_flops_match_hand_count():
    # q 4·4 + o 4·4 + k,v 2·4·2 = 48; MLP 3·4·6 = 72; scores+values 2 heads·(2+2)·8 keys = 64; head 40
    config = ModelConfig(**TINY, n_kv_heads=1)
    assert forward_flops_per_token(config, seq_len=8) == 2 * (48 + 72 + 64 + 40)
    assert flops_per_token(config, seq_len=8) == 6 * 224


def test_window_caps_the_attended_context():
    config = ModelConfig(**TINY, n_kv_heads=1, pattern=[LayerSpec(window=3)])
    assert flops_per_token(config, seq_len=8) == 6 * (48 + 72 + 8 * 3 + 40)
    assert flops_per_token(config, seq_len=2) == 6 * (48 + 72 + 8 * 2 + 40)


def test_mla_flops_match_hand_count():
    # q 4·2·(2+2) = 32, kv_a 4·(3+2) = 20, kv_b 3·2·(2+2) = 24, o 2·2·4 = 16; scores 2·(2+2+2)·8 = 96
    config = ModelConfig(
        **TINY,
        pattern=[LayerSpec("mla")],
        kv_lora_rank=3,
        qk_rope_head_dim=2,
        qk_nope_head_dim=2,
        v_head_dim=2,
    )
    assert flops_per_token(config, seq_len=8) == 6 * (92 + 72 + 96 + 40)


def test_shared_kv_layer_skips_its_kv_projections():
    config = ModelConfig(
        **{**TINY, "n_layers": 2}, n_kv_heads=1, pattern=[LayerSpec(), LayerSpec(kv_from=-1)]
    )
    owner, reader = 48 + 72 + 64, 32 + 72 + 64
    assert flops_per_token(config, seq_len=8) == 6 * (owner + reader + 40)


def test_mha_reduces_to_six_n_plus_twelve_l_d_t():
    config = tiny_base()
    model = CausalLM(config)
    matmul_weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    seq = 48
    expected = 6 * matmul_weights + 12 * config.n_layers * config.d_model * seq
    assert flops_per_token(config, seq) == expected


def test_non_positive_seq_len_is_rejected():
    with pytest.raises(ValueError, match="seq_len=0"):
        flops_per_token(tiny_base(), 0)
