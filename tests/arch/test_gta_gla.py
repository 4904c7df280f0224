"""GTA and GLA blocks (Zadouri, Strauss & Dao 2025). Their cached decode and cache bytes are covered with
every form in test_cached_decode/test_cache_bytes/test_static_decode; here: what makes each form what
it is, against a reference - GLA with one latent head is MLA, its absorbed decode equals the expanded
form, a query head reads only its latent head; GTA's key and value come from one tied state."""

from __future__ import annotations

import pytest
import torch

from kvforge.arch import CausalLM, LayerSpec, ModelConfig
from kvforge.arch.rope import RotaryEmbedding
from tests.arch.test_cached_decode import TOL, _cached_logits
from tests.conftest import tiny_base

MLA_SIZES = dict(kv_lora_rank=24, qk_rope_head_dim=4, qk_nope_head_dim=8, v_head_dim=8)


def test_gla_with_one_latent_head_is_mla():
    mla = CausalLM(tiny_base(pattern=[LayerSpec("mla")], **MLA_SIZES)).eval()
    gla = CausalLM(tiny_base(pattern=[LayerSpec("gla", n_latent_heads=1)], **MLA_SIZES)).eval()
    gla.load_state_dict(mla.state_dict())
    ids = torch.randint(0, 97, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(gla(ids), mla(ids), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("absorb", ["always", "never"])
@pytest.mark.parametrize("latent_heads", [2, 4])
def test_gla_absorbed_and_expanded_decode_match_the_uncached_forward(latent_heads, absorb):
    pattern = [LayerSpec("gla", n_latent_heads=latent_heads), LayerSpec("gla", kv_from=-1)]
    model = CausalLM(tiny_base(pattern=pattern, mla_absorb=absorb, **MLA_SIZES)).eval()
    ids = torch.randint(0, 97, (2, 14))
    with torch.no_grad():
        assert (_cached_logits(model, ids, [5, 1, 1, 7]) - model(ids)).abs().max().item() <= TOL


def _heads_of(model: CausalLM, x: torch.Tensor, dim: int):
    rope = RotaryEmbedding(dim, model.config.rope_theta)(torch.arange(x.shape[1]), torch.float32)
    return model.model.layers[0].self_attn.heads(x, rope)[0]


def test_a_gla_query_head_reads_only_its_latent_head():
    model = CausalLM(tiny_base(pattern=[LayerSpec("gla", n_latent_heads=2)], **MLA_SIZES)).eval()
    attn = model.model.layers[0].self_attn
    x = torch.randn(1, 6, 64)
    with torch.no_grad():
        _, k, v = _heads_of(model, x, 4)
        attn.kv_a_proj_with_mqa.weight[12:24] += 1.0  # latent head 1 only (rows 12..23 of the latent)
        _, k2, v2 = _heads_of(model, x, 4)
    # query heads 0-3 read latent head 0, heads 4-7 latent head 1
    torch.testing.assert_close(k2[:, :, :4], k[:, :, :4])
    torch.testing.assert_close(v2[:, :, :4], v[:, :, :4])
    assert (v2[:, :, 4:] - v[:, :, 4:]).abs().max() > 1e-3


def test_gta_key_and_value_come_from_one_tied_state():
    model = CausalLM(tiny_base(pattern=[LayerSpec("gta", 2)])).eval()
    q, k, v = _heads_of(model, torch.randn(1, 6, 64), 4)
    assert q.shape == (1, 6, 8, 8) and k.shape == v.shape == (1, 6, 2, 8)
    torch.testing.assert_close(
        k[..., :4], v[..., :4]
    )  # the no-RoPE half of the key is the state's first half
    torch.testing.assert_close(k[:, :, 0, 4:], k[:, :, 1, 4:])  # one rotary key for every group
    assert set(model.model.layers[0].self_attn.state_dict()) == {
        "q_proj.weight",
        "kv_proj.weight",
        "k_rope_proj.weight",
        "o_proj.weight",
    }


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        (
            {"pattern": [LayerSpec("gla", n_latent_heads=3)]},
            r"layers\[0\]\.n_latent_heads=3: .*allowed: \[1, 2, 4, 8\]",
        ),
        (
            {"pattern": [LayerSpec("gla", n_latent_heads=2)], "mla_rope_heads": 2},
            r"mla_rope_heads=2: gla layers",
        ),
        (
            {"pattern": [LayerSpec("gqa", n_latent_heads=2)]},
            r"layers\[0\]\.n_latent_heads=2: only gla layers",
        ),
        ({"pattern": [LayerSpec("gta")], "head_dim": 6}, r"head_dim=6: must be a multiple of 4 for gta"),
    ],
)
def test_invalid_gta_gla_configs_name_the_layer_and_field(fields, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig(vocab_size=97, d_model=64, n_layers=2, n_heads=8, **MLA_SIZES, **fields)
