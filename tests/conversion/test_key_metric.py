"""The metrics conversions fit in (conversion/transforms/key_metric.py), the linear latent norm, and the
refinement guard: each against a brute-force reference or an end-to-end comparison on stories260K."""

from __future__ import annotations

import torch

from kvforge.arch.model import DecoderLayer
from kvforge.conversion.transforms import fitting, latent_norm, to_gqa, to_mla
from kvforge.conversion.transforms.key_metric import attention_moment, centered_readout, to_metric
from kvforge.conversion.transforms.mla_rope import attention_probabilities
from kvforge.conversion.transforms.rotary import pair_frequencies
from tests.conftest import tiny_base
from tests.conversion.stories_data import calibration_ids, loss, stories


def _attention(seed: int = 0):
    torch.manual_seed(seed)
    config = tiny_base(n_kv_heads=2)
    return config, DecoderLayer(config, 0).self_attn.double()


def test_attention_moment_is_the_second_moment_of_the_attention_averaged_inputs():
    config, attn = _attention()
    x = [torch.randn(3, 11, config.d_model, dtype=torch.float64)]
    freqs = pair_frequencies(config)
    moment = attention_moment(attn, x, freqs, rows_per_step=2)
    probs = attention_probabilities(attn, x[0], freqs)  # (b, H, t, s)
    means = torch.einsum("bhts,bsd->bhtd", probs, x[0])  # m_t per head
    expected = torch.einsum("bhtd,bhte->de", means, means) / (probs.shape[1] * 3 * 11)
    torch.testing.assert_close(moment, expected, rtol=1e-10, atol=1e-12)


def test_value_error_cost_is_exactly_the_trace_in_the_attention_moment():
    """A value error E (rows acting on x) moves each query's output by E m_t: its mean square over
    queries and heads is tr(E M Eᵀ) - no independence assumption."""
    config, attn = _attention(1)
    x = [torch.randn(2, 9, config.d_model, dtype=torch.float64)]
    freqs = pair_frequencies(config)
    error = torch.randn(5, config.d_model, dtype=torch.float64)
    probs = attention_probabilities(attn, x[0], freqs)
    moved = torch.einsum("bhts,bsd,kd->bhtk", probs, x[0], error)
    direct = moved.pow(2).sum(-1).mean()
    assert torch.allclose(
        direct, torch.trace(error @ attention_moment(attn, x, freqs) @ error.mT), rtol=1e-10
    )


def test_centered_readout_is_least_squares_on_centered_inputs():
    """Position-free keys: the readout minimises the centered error (any constant shift is free)."""
    torch.manual_seed(0)
    d, r = 12, 5
    u = torch.randn(4000, d, dtype=torch.float64) + 0.8 * torch.randn(d, dtype=torch.float64)
    u = u @ torch.linalg.inv(torch.linalg.cholesky(u.mT @ u / len(u))).mT  # whitened: E[u uᵀ] = I
    mean = u.mean(0)
    keys = torch.randn(7, d, dtype=torch.float64)
    basis = torch.linalg.qr(torch.randn(d, r, dtype=torch.float64))[0].mT
    readout = centered_readout(keys, basis, mean)
    centered = u - mean
    reference = torch.linalg.lstsq(centered @ basis.mT, centered @ keys.mT).solution.mT
    torch.testing.assert_close(readout, reference, rtol=1e-8, atol=1e-8)
    # and the metric's square root reproduces the centered energy
    rows = torch.randn(3, d, dtype=torch.float64)
    torch.testing.assert_close(
        to_metric(rows, mean).pow(2).sum(-1), (centered @ rows.mT).pow(2).mean(0), rtol=1e-8, atol=1e-10
    )


def test_merging_values_in_the_attention_metric_beats_the_uniform_metric_on_stories260k(monkeypatch):
    """to_mqa on the real stories260K: the attention-averaged value metric lowers the loss."""
    from kvforge.conversion.transforms import gqa

    source, calibration = stories(), calibration_ids()
    with_metric = loss(*to_gqa(source.config, source.state_dict, calibration, n_kv_heads=1))

    def uniform(sources, averaged, whitening, freqs, bias):
        eye = torch.eye(whitening.R.shape[0], dtype=torch.float64)
        return eye, eye

    monkeypatch.setattr(gqa, "value_metric", uniform)
    without = loss(*to_gqa(source.config, source.state_dict, calibration, n_kv_heads=1))
    assert with_metric < without - 0.05  # measured: 1.48 vs 1.62 above the source on this slice


def test_linear_latent_norm_keeps_the_latent_in_the_eps_dominated_regime():
    """latent_norm='linear': on calibration inputs kv_a_layernorm (at kvforge's raised eps) is a constant
    scale to 1e-3."""
    source, calibration = stories(), calibration_ids()
    config, state_dict = to_mla(source.config, source.state_dict, calibration, kv_lora_rank=24, rope_dims=8)
    assert config.norm_eps == 1e-6  # what servers reading rms_norm_eps need for the latent norm
    from tests.conversion.stories_data import model_of

    model = model_of(config, state_dict)
    captured = []
    attn = model.model.layers[2].self_attn
    attn.kv_a_layernorm.register_forward_pre_hook(lambda module, args: captured.append(args[0]))
    with torch.no_grad():
        model(calibration)
    latent = captured[0].double()
    normed = attn.kv_a_layernorm(captured[0]).double()
    eps = config.mla_latent_norm_eps
    assert eps == latent_norm.LINEAR_EPS
    linear = latent * attn.kv_a_layernorm.weight.double() / eps**0.5
    assert float(latent.pow(2).mean(-1).max()) <= 1.01 * latent_norm.LINEAR_MARGIN * eps
    assert ((normed - linear).norm(dim=-1) / linear.norm(dim=-1)).max() < 1e-3


def test_linear_latent_norm_beats_the_calibrated_flattening_on_stories260k():
    source, calibration = stories(), calibration_ids()
    results = {
        mode: loss(
            *to_mla(
                source.config, source.state_dict, calibration, kv_lora_rank=24, rope_dims=8, latent_norm=mode
            )
        )
        for mode in ("linear", "flatten")
    }
    assert results["linear"] < results["flatten"]  # measured: +0.28 vs +0.37 above the source


def test_flattening_fit_reads_a_bounded_number_of_tokens(monkeypatch):
    """No fit is quadratic in the calibration size: the token-kernel solve sees <= MAX_TOKENS rows."""
    seen = []
    real = latent_norm.quadratic_fit
    monkeypatch.setattr(latent_norm, "quadratic_fit", lambda latent: seen.append(len(latent)) or real(latent))
    latent_norm.fit_latent_norm(torch.randn(3 * latent_norm.MAX_TOKENS + 7, 8, dtype=torch.float64))
    assert seen and max(seen) <= latent_norm.MAX_TOKENS


def test_refinement_never_leaves_a_worse_fit_than_the_closed_form():
    """A learning rate far too large must not wreck the layer: the closed form is kept."""
    config, attn = _attention(2)
    attn = attn.float()
    inputs = [torch.randn(4, 16, config.d_model)]
    rope = _rope(config, 16)
    targets = [attn(inputs[0], rope, None, 0, None)[0].detach() + 0.1 * torch.randn(4, 16, config.d_model)]
    unit = fitting.FitUnit(attn, inputs, targets, rope)
    before = fitting.relative_error([unit])
    weights = {name: p.detach().clone() for name, p in attn.named_parameters()}
    after = fitting.refine_attention([unit], steps=20, lr=1e3)
    assert after <= before
    if after == before:
        for name, p in attn.named_parameters():
            assert torch.equal(p, weights[name])


def _rope(config, seq):
    from kvforge.arch.model import rotary_key
    from kvforge.conversion.transforms.calibration import rope_tables

    return rope_tables(config, seq)[rotary_key(config, config.layers[0])]
