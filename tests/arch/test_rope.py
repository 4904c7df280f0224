"""RoPE frequencies and scalings match transformers' ROPE_INIT_FUNCTIONS."""

from __future__ import annotations

import pytest
import torch

from kvforge.arch import RopeScaling
from kvforge.arch.rope import rope_frequencies

transformers = pytest.importorskip("transformers")


def _hf(rope_parameters: dict, head_dim: int, max_pos: int):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = LlamaConfig(
        hidden_size=head_dim * 4,
        num_attention_heads=4,
        head_dim=head_dim,
        max_position_embeddings=max_pos,
        rope_parameters=rope_parameters,
    )
    return ROPE_INIT_FUNCTIONS[rope_parameters["rope_type"]](config, "cpu")


@pytest.mark.parametrize(
    ("ours", "theirs"),
    [
        (RopeScaling("linear", 4.0), {"rope_type": "linear", "factor": 4.0}),
        (
            RopeScaling("llama3", 8.0, original_max_seq_len=8192, low_freq_factor=1.0, high_freq_factor=4.0),
            {
                "rope_type": "llama3",
                "factor": 8.0,
                "original_max_position_embeddings": 8192,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
            },
        ),
        (
            RopeScaling(
                "yarn",
                40.0,
                original_max_seq_len=4096,
                beta_fast=32,
                beta_slow=1,
                mscale=1.0,
                mscale_all_dim=1.0,
            ),
            {
                "rope_type": "yarn",
                "factor": 40.0,
                "original_max_position_embeddings": 4096,
                "beta_fast": 32,
                "beta_slow": 1,
                "mscale": 1.0,
                "mscale_all_dim": 1.0,
            },
        ),
        (
            RopeScaling("yarn", 4.0, original_max_seq_len=32768),
            {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768},
        ),
    ],
)
def test_scaled_frequencies_match_transformers(ours, theirs):
    theta = 500000.0
    inv_freq, factor = rope_frequencies(64, theta, ours)
    hf_inv_freq, hf_factor = _hf({**theirs, "rope_theta": theta}, 64, 131072)
    torch.testing.assert_close(inv_freq, hf_inv_freq, rtol=1e-6, atol=0)
    assert factor == pytest.approx(hf_factor)


def test_default_frequencies_are_theta_powers():
    inv_freq, factor = rope_frequencies(8, 10000.0)
    torch.testing.assert_close(inv_freq, torch.tensor([1.0, 0.1, 0.01, 0.001]))
    assert factor == 1.0
