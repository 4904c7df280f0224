"""Key errors up to what the softmax cannot see: a key's mean is (nearly) free.

A score error that is the same for every key a query attends to shifts all its logits alike, and the
softmax ignores it. A key error ``e(x)`` splits into its mean ``ē`` over tokens and the rest. The
mean's score ``Re(q·conj(ē)·exp(1j·ω·Δ))`` changes across the attended keys only through the rotation:

- not at all for a position-free key (MLA's latent part): its mean costs nothing;
- for a rotary pair of frequency ``ω``, by ``1 - |φ|²``, where ``φ = Σ_s p(t,s)·exp(1j·ω·(t-s))`` is
  the pair's phase coherence under the source attention ``p`` (averaged over queries ``t``): slow
  pairs over short attention spans keep it near 1, fast pairs lose it.

Real checkpoints make this matter: the mean is most of a layer's key energy (docs/results.md, "Real
checkpoints"), so an error measure that counts it spends the merge on a direction that hardly moves
attention. In whitened coordinates (``E[u uᵀ] = I``, mean ``ū``) the
metric of a key error is ``I - (1 - γ) ū ūᵀ`` with ``γ`` the share of the mean that still counts.
Keys are mapped into that metric (:func:`to_metric`), merged or factored there, and mapped back.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .mla_rope import attention_probabilities
from .whitening import Whitening, flat_inputs


def white_mean(chunks: list[torch.Tensor], whitening: Whitening, bias: bool) -> torch.Tensor:
    """``ū = E[u]`` of the whitened inputs ``u = R⁻ᵀ x`` as a row (``‖ū‖ < 1``)."""
    return flat_inputs(chunks, bias).mean(0) @ whitening.R_inv.to(torch.float64)


def _shrink(mean: torch.Tensor, counted: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor]:
    """The unit mean ``û`` and ``c`` with ``(I - (1-γ) ū ūᵀ)^½ = I - c û ûᵀ``."""
    norm2 = min(float(mean @ mean), 1 - 1e-12)
    counted = torch.as_tensor(counted, dtype=torch.float64, device=mean.device)
    return mean / norm2**0.5, 1 - (1 - (1 - counted) * norm2).sqrt()


def to_metric(
    rows: torch.Tensor, mean: torch.Tensor | None, counted: torch.Tensor | float = 0.0
) -> torch.Tensor:
    """``rows · (I - (1-γ) ū ūᵀ)^½``. ``rows``: ``(..., d)`` real or complex whitened rows; ``counted``
    (γ) broadcasts against ``rows.shape[:-1]`` (e.g. one value per rotary pair)."""
    if mean is None:
        return rows
    unit, shrink = _shrink(mean, counted)
    return rows - (shrink * (rows @ unit.to(rows.dtype))).unsqueeze(-1) * unit.to(rows.dtype)


def from_metric(
    rows: torch.Tensor, mean: torch.Tensor | None, counted: torch.Tensor | float = 0.0
) -> torch.Tensor:
    """Inverse of :func:`to_metric` (``(I - c ûûᵀ)⁻¹ = I + c/(1-c) ûûᵀ``)."""
    if mean is None:
        return rows
    unit, shrink = _shrink(mean, counted)
    grow = shrink / (1 - shrink)
    return rows + (grow * (rows @ unit.to(rows.dtype))).unsqueeze(-1) * unit.to(rows.dtype)


def centered_readout(keys: torch.Tensor, basis: torch.Tensor, mean: torch.Tensor | None) -> torch.Tensor:
    """Least-squares coefficients of position-free ``keys`` (``(..., d)`` rows) on an orthonormal latent
    ``basis`` (``(r, d)``) under the centered metric ``M = I - ū ūᵀ``: ``K M Bᵀ (B M Bᵀ)⁻¹``."""
    if mean is None:
        return keys @ basis.mT
    b = basis @ mean
    projected = keys @ basis.mT - (keys @ mean).unsqueeze(-1) * b  # K M Bᵀ
    return projected + (projected @ b).unsqueeze(-1) * b / (1 - float(b @ b))  # (I - bbᵀ)⁻¹


def centered_output_energy(
    values: torch.Tensor, out_gram: torch.Tensor, mean: torch.Tensor | None
) -> torch.Tensor:
    """Per head ``E‖O_h (v - v̄)‖²``: what a score error can move (the value mean passes the softmax)."""
    energy = torch.einsum("hkd,hkl,hld->h", values, out_gram, values)
    if mean is None:
        return energy
    value_mean = values @ mean
    return energy - torch.einsum("hk,hkl,hl->h", value_mean, out_gram, value_mean)


@torch.no_grad()
def attention_key_moments(
    attn, inputs: list[torch.Tensor], freqs: torch.Tensor, rows_per_step: int = 4, averaged=None
):
    """Second moments of the key-side inputs as the source attention sees them, averaged over heads:

    - ``K = E_t Σ_s p(t,s) x_s x_sᵀ`` (each key token weighted by the attention it receives),
    - ``M = E_t m_t m_tᵀ`` with ``m_t = Σ_s p(t,s) x_s`` (what a query's attention averages).

    ``K - M = E_t Cov_{s~p(t,·)}(x_s)`` is the metric of a position-free key error that the softmax
    sees: the spread of its score over the keys a query attends to. ``(d, d)`` float64 each, on the
    inputs ``x`` of the attention (RMS-normed stream chunks ``(batch, seq, d)``)."""
    averaged = inputs if averaged is None else averaged
    d = averaged[0].shape[-1]
    K = torch.zeros(d, d, dtype=torch.float64, device=freqs.device)
    M = torch.zeros_like(K)
    count = 0
    for chunk, other in zip(inputs, averaged):
        for x, y in zip(chunk.split(rows_per_step), other.split(rows_per_step)):
            probs = attention_probabilities(attn, x, freqs)  # (b, H, t, s)
            batch, heads, seq, _ = probs.shape
            received = probs.sum(2)  # (b, H, s)
            yd = y.to(torch.float64)
            K += torch.einsum("bhs,bsd,bse->de", received.to(torch.float64), yd, yd) / heads
            means = probs.to(y.dtype) @ y.unsqueeze(1)  # (b, H, t, d)
            flat = means.reshape(-1, d).to(torch.float64)
            M += flat.mT @ flat / heads
            count += batch * seq
    return K / count, M / count


@dataclass
class AttentionMetric:
    """Square roots (and inverses) of the metrics in which merged keys and values are fitted, in the
    whitened coordinates of the inputs the new projections read (``E[u uᵀ] = I``).

    - keys: ``K = E_t Σ_s p(t,s) u_s u_sᵀ``, each token weighted by the attention it receives (a key
      error costs where queries look; the uniform ``I`` assumes every key is looked at alike);
    - values: ``M = E_t m_t m_tᵀ``, ``m_t = Σ_s p(t,s) u_s``: a value error ``E u`` reaches the output as
      ``E m_t``, so ``E‖E m_t‖² = tr(E M Eᵀ)`` exactly (no independence assumption).

    Each is blended with a little of the uniform metric (``blend · I`` after scaling to unit mean
    eigenvalue) so that directions no calibration token exercises keep a finite cost."""

    key_root: torch.Tensor
    key_root_inv: torch.Tensor
    value_root: torch.Tensor
    value_root_inv: torch.Tensor


def _roots(moment: torch.Tensor, blend: float) -> tuple[torch.Tensor, torch.Tensor]:
    moment = (moment + moment.mT) / 2
    scale = float(moment.diagonal().mean().clamp_min(1e-300))
    eye = torch.eye(len(moment), dtype=moment.dtype, device=moment.device)
    evals, evecs = torch.linalg.eigh((1 - blend) * moment / scale + blend * eye)
    evals = evals.clamp_min(blend * 1e-3)
    return evecs @ torch.diag(evals.sqrt()) @ evecs.mT, evecs @ torch.diag(evals.rsqrt()) @ evecs.mT


def attention_metric(
    sources: list[tuple[torch.nn.Module, list[torch.Tensor]]],
    averaged: list[torch.Tensor],
    whitening: Whitening,
    freqs: torch.Tensor,
    bias: bool,
    blend: float = 0.01,
) -> AttentionMetric:
    """The :class:`AttentionMetric` of one or several source attention modules (each with the inputs it
    reads; several for layers that will share K/V), all averaging the same new inputs ``averaged``."""
    if bias:  # the new rows act on [x, 1]: average the constant coordinate too
        averaged = [torch.cat((x, torch.ones_like(x[..., :1])), dim=-1) for x in averaged]
    K = M = None
    for attn, inputs in sources:
        k, m = attention_key_moments(attn, inputs, freqs, averaged=averaged)
        K, M = (k, m) if K is None else (K + k, M + m)
    K, M = K / len(sources), M / len(sources)
    R_inv = whitening.R_inv.to(torch.float64)
    K, M = R_inv.mT @ K @ R_inv, R_inv.mT @ M @ R_inv
    return AttentionMetric(*_roots(K, blend), *_roots(M, blend))
