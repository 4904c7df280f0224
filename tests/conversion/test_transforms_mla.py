"""to_mla: the lossless bound, the two DeepseekV3 layout facts (shared rotary key, latent RMSNorm)
with their residual errors, exportability to stock DeepseekV3, the linear-regime latent's trainable
parametrisation (raised eps) and its exact export, and bad options."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from safetensors.torch import load_file

from kvforge.arch import CausalLM, ModelConfig
from kvforge.arch.attention_mla import MLA_NORM_EPS
from kvforge.arch.rope import rope_frequencies
from kvforge.conversion import load_pretrained, save_pretrained
from kvforge.conversion.gguf import export_gguf, import_gguf
from kvforge.conversion.transforms import to_gqa, to_mla
from kvforge.conversion.transforms.latent_norm import LINEAR_EPS, fit_latent_norm
from kvforge.conversion.transforms.merge import HeadTargets, merge_keys
from kvforge.conversion.transforms.mla_rope import check_exportable, exported_theta, select_pairs
from kvforge.conversion.transforms.rotary import as_pairs
from tests.conversion.hf_tiny import load_hf
from tests.conversion.stories_data import calibration_ids, evaluation_ids, logits, loss, model_of, stories

LOSSLESS_ATOL = 1e-4


@pytest.mark.parametrize("calibrated", [False, True])
def test_full_rank_all_pairs_kvforge_layout_reproduces_the_source_logits(calibrated):
    """Per-K/V-head rotary keys, every pair kept, full latent rank, no latent norm: the bound."""
    source = stories()
    calibration = calibration_ids() if calibrated else None
    config, state_dict = to_mla(
        source.config, source.state_dict, calibration, kv_lora_rank=32, rope_dims=8, layout="kvforge"
    )
    assert config.mla_rope_heads == 4 and not config.mla_latent_norm and config.qk_nope_head_dim == 0
    ids = evaluation_ids(257)[None, :256]
    diff = logits(config, state_dict, ids) - logits(source.config, source.state_dict, ids)
    assert diff.abs().max().item() <= LOSSLESS_ATOL


def test_deepseek_layout_has_one_shared_rotary_key_and_a_latent_norm():
    source = stories()
    config, state_dict = to_mla(source.config, source.state_dict, kv_lora_rank=24, rope_dims=8)
    assert config.mla_rope_heads == 1 and config.mla_latent_norm
    assert state_dict["model.layers.0.self_attn.kv_a_proj_with_mqa.weight"].shape == (24 + 8, 64)
    assert "model.layers.0.self_attn.kv_a_layernorm.weight" in state_dict


def test_shared_rotary_key_is_exact_for_identical_heads_and_lossy_for_real_ones():
    """(a) One rotary key for all heads: heads that agree merge exactly; stories260K's four K/V
    heads do not - the residual (what the shared key misses) is what goes to the latent."""
    copies = as_pairs(torch.randn(8, 64, dtype=torch.float64), 1).expand(4, -1, -1)
    weight = torch.ones(4, 4, dtype=torch.float64)
    _, _, exact = merge_keys(HeadTargets(copies, weight, None, None), range(4))
    real = as_pairs(stories().state_dict["model.layers.0.self_attn.k_proj.weight"], 4)
    _, _, residual = merge_keys(HeadTargets(real, weight, None, None), range(4))
    assert exact < 1e-20
    assert 0.05 < residual / float(real.abs().pow(2).sum()) < 1.0  # measured: 0.43


def test_carrying_the_rotary_residual_in_the_latent_beats_dropping_it():
    """(a) At full latent rank the shared-key residual rides in the position-free latent (with its
    best fixed phase); dropping it (rank just large enough for values + position-free keys of the
    per-head layout) loses more."""
    source = stories()
    calibration = calibration_ids()
    carried = loss(*to_mla(source.config, source.state_dict, calibration, kv_lora_rank=64, rope_dims=8))
    base = loss(source.config, source.state_dict)
    assert carried - base < 0.25  # measured on this slice: +0.08


def test_latent_norm_calibration_flattens_the_rms_of_real_latents():
    """(b) kv_a_layernorm: a basis in which rms(latent) varies least; the spread left is the error."""
    source = stories()
    ids = calibration_ids()
    _, state_dict = to_mla(
        source.config, source.state_dict, ids, kv_lora_rank=24, rope_dims=8, latent_norm="flatten"
    )
    # the same latents, measured again through the public pieces: the spread before and after
    model = model_of(source.config, source.state_dict)
    x = model.model.layers[0].input_layernorm(model.model.embed_tokens(ids)).reshape(-1, 64).double()
    rows = state_dict["model.layers.0.self_attn.kv_a_proj_with_mqa.weight"][:24].double()
    norm = fit_latent_norm(x @ rows.mT)
    assert norm.spread_after < norm.spread_before
    assert norm.spread_before < 0.3  # measured: the whitened latent's rms varies by ~15 %


def test_latent_norm_is_exact_when_the_latent_rms_is_constant():
    latent = torch.nn.functional.normalize(torch.randn(512, 16, dtype=torch.float64), dim=-1) * 3.0
    norm = fit_latent_norm(latent, flatten=False)
    normed = norm.weight * latent / (latent.pow(2).mean(-1, keepdim=True) + 1e-6).sqrt()
    assert norm.spread_before < 1e-12
    assert torch.allclose(normed @ norm.readout.mT, latent, atol=1e-9)


def test_latent_norm_costs_less_calibrated_than_as_a_constant():
    """(b) End to end on stories260K: flattening the latent's rms beats only fitting the norm's weight."""
    source = stories()
    calibration = calibration_ids()
    flat = loss(*to_mla(source.config, source.state_dict, calibration, kv_lora_rank=24, rope_dims=8))
    constant = loss(
        *to_mla(
            source.config, source.state_dict, calibration, kv_lora_rank=24, rope_dims=8, latent_norm="weight"
        )
    )
    assert flat < constant


def test_mla_at_quarter_of_mha_bytes_beats_gqa_at_equal_bytes():
    """32 cached floats per token and layer (MHA = 128): MLA (24 latent + 8 rotary) vs GQA-2."""
    source = stories()
    calibration = calibration_ids()
    mla_loss = loss(*to_mla(source.config, source.state_dict, calibration, kv_lora_rank=24, rope_dims=8))
    gqa_loss = loss(*to_gqa(source.config, source.state_dict, calibration, n_kv_heads=2))
    assert mla_loss < gqa_loss


def test_deepseek_layout_exports_as_stock_deepseek_v3_with_equal_logits(tmp_path):
    source = stories()
    config, state_dict = to_mla(
        source.config,
        source.state_dict,
        calibration_ids(),
        kv_lora_rank=28,
        rope_dims=4,
        rope_selection="uniform",
    )
    out = save_pretrained(config, state_dict, tmp_path / "mla", tokenizer_from=source.source)
    hf = load_hf(out)
    assert type(hf).__name__ == "DeepseekV3ForCausalLM"
    ids = evaluation_ids(257)[None, :256]
    with torch.no_grad():
        assert (hf(ids).logits - logits(config, state_dict, ids)).abs().max().item() <= 1e-4


def test_deepseek_sized_conversion_exports_with_vllm_mla_shapes(tmp_path):
    """kv_lora_rank 512 and a 64-dim rotary key, as DeepSeek-V3 (what vLLM's MLA kernels expect)."""
    torch.manual_seed(0)
    source = ModelConfig(
        vocab_size=64,
        d_model=512,
        n_layers=1,
        n_heads=4,
        n_kv_heads=4,
        head_dim=128,
        ffn_dim=64,
        max_seq_len=32,
        init_std=0.02,
    )
    weights = CausalLM(source).state_dict()
    config, state_dict = to_mla(source, weights, kv_lora_rank=512, rope_dims=64, rope_selection="high")
    out = save_pretrained(config, state_dict, tmp_path / "big")
    hf_config = load_hf(out).config
    assert (
        hf_config.kv_lora_rank,
        hf_config.qk_rope_head_dim,
        hf_config.qk_nope_head_dim,
        hf_config.v_head_dim,
    ) == (512, 64, 128, 128)
    assert hf_config.num_key_value_heads == hf_config.num_attention_heads


@pytest.mark.parametrize("kept", [[0], [0, 1], [0, 2], [0, 1, 2]])
def test_exported_theta_reproduces_the_kept_source_frequencies(kept):
    theta = exported_theta(10000.0, 8, kept)
    deepseek, _ = rope_frequencies(2 * len(kept), theta)
    source, _ = rope_frequencies(8, 10000.0)
    assert torch.allclose(deepseek.double(), source[kept].double(), rtol=1e-6)


def test_pairs_that_are_not_a_progression_are_refused():
    freqs = rope_frequencies(8, 10000.0)[0].double()
    with pytest.raises(ValueError, match="not a progression"):
        check_exportable(freqs, [1, 2], exported_theta(10000.0, 8, [1, 2]))


def test_selection_strategies_pick_progressions_through_the_highest_frequency():
    scores = torch.tensor([1.0, 0.1, 5.0, 0.2, 0.0, 0.0, 0.0, 0.0])
    assert select_pairs(8, 2, "high", None) == [0, 1]
    assert select_pairs(8, 2, "uniform", None) == [0, 4]
    assert select_pairs(8, 2, "contribution", scores) == [0, 2]
    assert select_pairs(8, 4, "uniform", None) == [0, 2, 4, 6]


@pytest.mark.parametrize(
    ("options", "match"),
    [
        (dict(kv_lora_rank=100, rope_dims=4), r"kv_lora_rank=100 must be in 1\.\.64"),
        (dict(kv_lora_rank=0, rope_dims=4), r"kv_lora_rank=0 must be in"),
        (dict(kv_lora_rank=16, rope_dims=3), r"rope_dims=3 must be an even number"),
        (
            dict(kv_lora_rank=16, rope_dims=10),
            r"rope_dims=10 must be an even number of rotary dims in 2\.\.head_dim=8",
        ),
        (dict(kv_lora_rank=16, rope_dims=4, layout="vllm"), r"layout='vllm'"),
        (dict(kv_lora_rank=16, rope_dims=4, rope_selection="random"), r"rope_selection='random'"),
    ],
)
def test_bad_mla_options_are_clear_errors(options, match):
    source = stories()
    with pytest.raises(ValueError, match=match):
        to_mla(source.config, source.state_dict, **options)


def test_mla_refuses_sources_it_cannot_express():
    source = stories()
    yarn = source.config.replace(rope_scaling={"type": "yarn", "factor": 4.0, "original_max_seq_len": 64})
    with pytest.raises(ValueError, match="rope_scaling of type yarn"):
        to_mla(yarn, source.state_dict, kv_lora_rank=16, rope_dims=4)


# ------------------------------------------------------------------ the linear regime, at a trainable scale
def _rms(tensor: torch.Tensor) -> float:
    return float(tensor.double().pow(2).mean().sqrt())


def _linear_mla(rope_selection: str = "contribution"):
    source = stories()
    converted = to_mla(
        source.config,
        source.state_dict,
        calibration_ids(),
        kv_lora_rank=24,
        rope_dims=8,
        rope_selection=rope_selection,
    )
    return source, *converted


def test_linear_latent_rows_have_the_source_key_rows_scale():
    """The rule: kv_a_proj_with_mqa's latent rows get the RMS of the source's k_proj rows, so Adam's
    steps (an absolute size) are as large relative to them as they were to k_proj; the norm's eps rises
    to keep the latent eps-dominated (tested in test_key_metric)."""
    source, config, state_dict = _linear_mla()
    assert config.mla_latent_norm_eps == LINEAR_EPS
    for index in range(config.n_layers):
        prefix = f"model.layers.{index}.self_attn."
        rows = state_dict[prefix + "kv_a_proj_with_mqa.weight"][: config.kv_lora_rank]
        key = source.state_dict[prefix + "k_proj.weight"]
        assert _rms(rows) == pytest.approx(_rms(key), rel=1e-5), index


def _at_deepseek_eps(config: ModelConfig, state_dict: dict) -> tuple[ModelConfig, dict]:
    """The same model with DeepSeek's fixed eps: latent rows scaled by √(1e-6 / eps)."""
    factor = (MLA_NORM_EPS / config.mla_latent_norm_eps) ** 0.5
    stock = dict(state_dict)
    for index in range(config.n_layers):
        name = f"model.layers.{index}.self_attn.kv_a_proj_with_mqa.weight"
        rows = stock[name].clone()
        rows[: config.kv_lora_rank] *= factor
        stock[name] = rows
    return dataclasses.replace(config, mla_latent_norm_eps=MLA_NORM_EPS), stock


def test_raised_latent_eps_computes_what_deepseeks_eps_does_on_rows_scaled_back():
    """RMSNorm(s·c; eps·s²) = RMSNorm(c; eps): the trainable and the stock parametrisation agree."""
    _, config, state_dict = _linear_mla()
    assert (MLA_NORM_EPS / config.mla_latent_norm_eps) ** 0.5 == 2.0**-17  # exact rescaling
    ids = evaluation_ids(257)[None, :256]
    expected = logits(*_at_deepseek_eps(config, state_dict), ids)
    assert (logits(config, state_dict, ids) - expected).abs().max().item() <= 1e-5  # fp32 round-off


def test_stock_export_scales_the_latent_rows_back_exactly_and_import_restores_them(tmp_path):
    source, config, state_dict = _linear_mla("uniform")
    out = save_pretrained(config, state_dict, tmp_path / "mla", tokenizer_from=source.source)
    stored = load_file(out / "model.safetensors")
    name = "model.layers.0.self_attn.kv_a_proj_with_mqa.weight"
    rank = config.kv_lora_rank
    assert torch.equal(stored[name][:rank], state_dict[name][:rank] * 2.0**-17)  # what stock readers see
    back = load_pretrained(out)
    assert back.config.mla_latent_norm_eps == config.mla_latent_norm_eps
    assert torch.equal(back.state_dict[name], state_dict[name])


def test_gguf_export_of_the_linear_regime_matches_kvforge_logits(tmp_path):
    """llama.cpp's deepseek2 reads the latent norm at 1e-6: the export scales the rows back."""
    source, config, state_dict = _linear_mla("uniform")
    path, _ = export_gguf(config, state_dict, tmp_path / "mla.gguf", tokenizer_from=source.source)
    back = load_pretrained(import_gguf(path, tmp_path / "back"))
    assert back.config.mla_latent_norm_eps == MLA_NORM_EPS
    ids = evaluation_ids(257)[None, :256]
    expected = logits(config, state_dict, ids)
    assert (logits(back.config, back.state_dict, ids) - expected).abs().max().item() <= 1e-4
