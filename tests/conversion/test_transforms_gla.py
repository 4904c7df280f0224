"""to_gla: MLA (or MHA/GQA through to_mla) → grouped-latent attention at the same cache width. The split
is exact when each group's up-projection fits its latent head, calibration helps on the real
stories260K, and what GLA cannot hold is refused with the reason."""

from __future__ import annotations

import pytest
import torch

from kvforge.arch import CausalLM, LayerSpec, kv_cache_bytes
from kvforge.conversion.transforms import check_options, to_gla, to_mla
from tests.conftest import tiny_base, tiny_form
from tests.conversion.stories_data import calibration_ids, loss, model_of, stories

MLA_SIZES = dict(kv_lora_rank=24, qk_rope_head_dim=4, qk_nope_head_dim=8, v_head_dim=8)


def _mla_whose_groups_fit_latent_heads_of(r: int, groups: int):
    config = tiny_base(pattern=[LayerSpec("mla")], mla_latent_norm=False, **MLA_SIZES)
    model = CausalLM(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            w_b = layer.self_attn.kv_b_proj.weight  # (8 heads · 16, 24)
            low_rank = torch.randn(groups, w_b.shape[0] // groups, r) @ torch.randn(groups, r, 24) * 0.2
            w_b.copy_(low_rank.reshape(w_b.shape))
    return config, model


@pytest.mark.parametrize("n_latent_heads", [2, 4])
def test_split_is_exact_when_each_group_fits_its_latent_head(n_latent_heads):
    config, model = _mla_whose_groups_fit_latent_heads_of(24 // n_latent_heads, n_latent_heads)
    ids = torch.randint(0, 97, (2, 12))
    new_config, state_dict = to_gla(config, model.state_dict(), n_latent_heads=n_latent_heads)
    assert [(s.attention, s.n_latent_heads) for s in new_config.layers] == [("gla", n_latent_heads)] * 4
    assert kv_cache_bytes(new_config, 12) == kv_cache_bytes(config, 12)  # the same cache width as MLA
    converted = CausalLM(new_config).eval()
    converted.load_state_dict(state_dict)
    with torch.no_grad():
        torch.testing.assert_close(converted(ids), model(ids), rtol=0, atol=1e-4)


def test_calibration_beats_weights_alone_on_stories260k_from_gqa():
    pretrained = stories("stories260K")
    calibration = calibration_ids(4, 256)
    mla = to_mla(pretrained.config, pretrained.state_dict, calibration, kv_lora_rank=28, rope_dims=4)
    calibrated = to_gla(*mla, calibration, n_latent_heads=2)
    weights_only = to_gla(*mla, n_latent_heads=2)
    # measured with 8 x 256 calibration tokens: MLA 4.048, GLA-2 4.112 (weights alone 5.474)
    assert loss(*calibrated) < loss(*weights_only)
    direct = to_gla(
        pretrained.config, pretrained.state_dict, calibration, n_latent_heads=2, kv_lora_rank=28, rope_dims=4
    )
    assert direct[0].layers == calibrated[0].layers
    for name, tensor in calibrated[1].items():
        torch.testing.assert_close(direct[1][name], tensor)


@pytest.mark.parametrize(
    ("form", "options", "match"),
    [
        ("mla", {"n_latent_heads": 3}, r"n_latent_heads=3 must divide n_heads=8 and kv_lora_rank=24"),
        ("mix", {"n_latent_heads": 2}, r"to_gla: the source has \['gqa', 'mla'\] layers"),
        (
            "mla",
            {"n_latent_heads": 2, "kv_lora_rank": 8},
            r"options \['kv_lora_rank'\] are for MHA/GQA sources",
        ),
        ("gqa", {"n_latent_heads": 2, "kv_lora_rank": 0, "rope_dims": 4}, r"kv_lora_rank"),
    ],
)
def test_sources_gla_cannot_hold_are_refused(form, options, match):
    with pytest.raises(ValueError, match=match):
        check_options("gla", tiny_form(form), **options)


def test_cli_converts_gqa_to_gla_and_says_there_is_no_stock_class(tmp_path, capsys):
    from kvforge.cli.main import main
    from kvforge.conversion import load_pretrained
    from tests.conftest import shared_path

    args = [
        "convert",
        str(shared_path("stories260K")),
        str(tmp_path / "gla"),
        "--to",
        "gla",
        "--n-latent-heads",
        "2",
    ]
    assert main([*args, "--kv-lora-rank", "28", "--rope-dims", "4"]) == 0
    assert "layer 0 is 'gla'" in capsys.readouterr().out
    assert load_pretrained(tmp_path / "gla").config.layers[0].n_latent_heads == 2


def test_latent_heads_are_split_at_unit_scale_and_deepseeks_eps():
    """GLA's per-head norm weights are fitted as if the norm were u/rms(u): the split puts every latent
    head at unit rms on calibration and the eps back at 1e-6, whatever scale (and eps) the MLA's latent
    had - to_mla's linear regime has it raised (test_transforms_mla)."""
    pretrained = stories("stories260K")
    calibration = calibration_ids(4, 256)
    mla = to_mla(pretrained.config, pretrained.state_dict, calibration, kv_lora_rank=28, rope_dims=4)
    assert mla[0].mla_latent_norm_eps > 1.0
    config, state_dict = to_gla(*mla, calibration, n_latent_heads=2)
    assert config.mla_latent_norm_eps == 1e-6
    model = model_of(config, state_dict)
    captured = []
    norm = model.model.layers[1].self_attn.kv_a_layernorm
    norm.register_forward_pre_hook(lambda module, args: captured.append(args[0].double()))
    with torch.no_grad():
        model(calibration)
    mean_square = captured[0].unflatten(-1, (2, -1)).pow(2).mean(-1)  # per token and latent head
    assert mean_square.mean((0, 1)).tolist() == pytest.approx(
        [1.0, 1.0], rel=0.1
    )  # fitted on MLA-layer inputs
