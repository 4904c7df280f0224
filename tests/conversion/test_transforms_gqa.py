"""to_gqa / to_mqa with the aligned (calibrated) method: exactness, RoPE safety and quality."""

from __future__ import annotations

import pytest
import torch

from kvforge.arch import CausalLM
from kvforge.arch.rope import RotaryEmbedding, apply_rope
from kvforge.conversion.transforms import to_gqa
from kvforge.conversion.transforms.merge import HeadTargets, best_partition, merge_keys
from kvforge.conversion.transforms.rotary import as_pairs, scale_pairs
from tests.conftest import tiny_form
from tests.conversion.stories_data import calibration_ids, evaluation_ids, logits, loss, stories


def test_stories260k_mha_to_gqa4_aligned_with_calibration_reproduces_stories260k():
    mha, gqa = stories("stories260K-mha"), stories("stories260K")
    config, state_dict = to_gqa(mha.config, mha.state_dict, calibration_ids(), n_kv_heads=4)
    ids = evaluation_ids(129)[None, :128]
    expected = logits(gqa.config, gqa.state_dict, ids)
    assert (logits(config, state_dict, ids) - expected).abs().max().item() <= 1e-5


def test_aligned_grouping_finds_the_duplicated_heads():
    """The heads of stories260K-mha are pairwise copies: (0,1), (2,3), … must be the groups."""
    keys = as_pairs(stories("stories260K-mha").state_dict["model.layers.0.self_attn.k_proj.weight"], 8)
    targets = HeadTargets(
        keys, torch.ones(8, 4, dtype=torch.float64), torch.zeros(8, 8, 1), torch.zeros(8, 8, 8)
    )
    groups = best_partition(8, 2, lambda g: merge_keys(targets, g)[2])
    assert sorted(groups) == [(0, 1), (2, 3), (4, 5), (6, 7)]


def test_merging_copies_of_one_key_returns_it_with_unit_scales():
    key = torch.randn(1, 4, 16, dtype=torch.complex128)
    targets = HeadTargets(key.expand(3, -1, -1), torch.rand(3, 4, dtype=torch.float64) + 0.5, None, None)
    merged, alpha, error = merge_keys(targets, [0, 1, 2])
    assert torch.allclose(merged, key[0]) and torch.allclose(alpha, torch.ones_like(alpha)) and error < 1e-20


def _scale_vectors(v: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """Multiply rotary pair i of each head of ``v`` (…, heads, head_dim) by ``factors[head, i]``."""
    half = v.shape[-1] // 2
    z = torch.complex(v[..., :half], v[..., half:]) * factors
    return torch.cat((z.real, z.imag), dim=-1)


def test_pair_scaling_commutes_with_rope_at_every_position():
    """Multiplying each rotary pair by a complex scalar (what the merge applies to keys and queries)
    commutes with RoPE; a generic 2x2 map on a pair does not (the property is not vacuous)."""
    cos, sin = RotaryEmbedding(8, 10000.0)(torch.arange(64), torch.float64)
    weight = torch.randn(2 * 8, 32, dtype=torch.float64)
    x = torch.randn(1, 64, 32, dtype=torch.float64)
    factors = torch.randn(2, 4, dtype=torch.complex128)

    def keys(w):  # RoPE'd keys (1, 64, 2 heads, 8)
        return apply_rope((x @ w.mT).view(1, 64, 2, 8), cos, sin)

    mapped_then_rotated = keys(scale_pairs(weight, 2, factors))
    assert torch.allclose(mapped_then_rotated, _scale_vectors(keys(weight), factors), atol=1e-10)
    # A real 2x2 map that is not a rotation-scaling: (re, im) -> (re, 2·im) on pair 0 of head 0.
    stretch = torch.ones(2, 8, dtype=torch.float64)
    stretch[0, 4] = 2.0
    stretched_then_rotated = keys(weight * stretch.reshape(-1, 1))
    rotated_then_stretched = keys(weight) * stretch
    assert torch.allclose(
        stretched_then_rotated[0, 0], rotated_then_stretched[0, 0]
    )  # position 0: no rotation
    assert (stretched_then_rotated[0, 1:] - rotated_then_stretched[0, 1:]).abs().max() > 1e-2


def test_merging_copied_heads_keeps_their_query_and_key_weights():
    """Copies merge into the head itself: α = 1, so queries and keys are the GQA checkpoint's, bit for bit."""
    mha = stories("stories260K-mha")
    _, state_dict = to_gqa(mha.config, mha.state_dict, n_kv_heads=4)
    for name in ("q_proj", "k_proj"):
        key = f"model.layers.2.self_attn.{name}.weight"
        assert torch.equal(state_dict[key], stories("stories260K").state_dict[key])


def test_aligned_gqa_beats_mean_pooling_by_a_clear_margin_on_stories260k():
    source = stories()
    calibration = calibration_ids()
    aligned = loss(*to_gqa(source.config, source.state_dict, calibration, n_kv_heads=2))
    mean = loss(*to_gqa(source.config, source.state_dict, n_kv_heads=2, method="mean"))
    base = loss(source.config, source.state_dict)
    # measured on this slice: source 1.32, aligned ≈ +0.7, mean-pool ≈ +3.1
    assert aligned - base < 0.5 * (mean - base)


def test_aligned_mqa_beats_mean_pooling_by_a_clear_margin_on_stories260k():
    source = stories()
    aligned = loss(*to_gqa(source.config, source.state_dict, calibration_ids(), n_kv_heads=1))
    mean = loss(*to_gqa(source.config, source.state_dict, n_kv_heads=1, method="mean"))
    base = loss(source.config, source.state_dict)
    assert aligned - base < 0.5 * (mean - base)


def test_aligned_without_calibration_still_beats_mean_pooling():
    source = stories()
    aligned = loss(*to_gqa(source.config, source.state_dict, n_kv_heads=2))
    mean = loss(*to_gqa(source.config, source.state_dict, n_kv_heads=2, method="mean"))
    assert aligned < mean - 1.0


@pytest.mark.parametrize("o_proj_bias", [False, True])  # Qwen2 / Llama's attention_bias
def test_calibrated_gqa_on_a_random_model_with_biases_loads_strictly(o_proj_bias):
    config = tiny_form("mha", attention_bias=True, o_proj_bias=o_proj_bias)
    source = CausalLM(config).state_dict()
    calibration = torch.randint(0, config.vocab_size, (2, 32))
    new_config, state_dict = to_gqa(config, source, calibration, n_kv_heads=2)
    assert [spec.n_kv_heads for spec in new_config.layers] == [2] * config.n_layers
    CausalLM(new_config).load_state_dict(state_dict)  # strict: exactly the expected tensors
