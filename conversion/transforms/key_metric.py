"""The metrics merged and factored projections are fitted in: what attention actually does with them.

Every fit in :mod:`.merge` and :mod:`.mla` works in whitened input coordinates ``u`` (``E[u uᵀ] = I``),
where the expected squared error of a linear function of the input is the squared norm of its
coefficients. Two facts of softmax attention refine that uniform measure:

- **A value error reaches the output averaged by attention.** With ``m_t = Σ_s p(t,s) u_s`` the
  inputs a query's attention averages, a value error ``E u`` moves that query's output by ``E m_t``,
  so its cost is exactly ``tr(E M Eᵀ)`` with ``M = E_t m_t m_tᵀ`` (no independence assumption). Tokens
  that receive much attention (the first token, which real models use as an attention sink) weigh in
  ``M`` as much as they do in the outputs; in the uniform measure they are one token among thousands.
  :func:`value_metric` gives ``M``'s square root.
- **A position-free key's mean is softmax-invariant.** It adds the same score to every key a query
  sees, so MLA's latent keys are fitted centered (:func:`to_metric`, :func:`centered_readout`).
"""

from __future__ import annotations

import torch

from .mla_rope import attention_probabilities
from .whitening import Whitening, flat_inputs

# Share of the uniform metric mixed into M (scaled to a unit mean eigenvalue), so that directions no
# calibration query averages keep a finite cost and M's square root a bounded inverse.
BLEND = 0.01


@torch.no_grad()
def attention_moment(
    attn, inputs: list[torch.Tensor], freqs: torch.Tensor, averaged=None, rows_per_step: int = 4
):
    """``M = E_t m_t m_tᵀ``, ``m_t = Σ_s p(t,s) y_s``, averaged over the heads of the source GQA module
    ``attn`` (its attention ``p`` on ``inputs``); ``y`` is ``averaged`` (default ``inputs``): the
    inputs the new projections will read. ``(d, d)`` float64."""
    averaged = inputs if averaged is None else averaged
    d = averaged[0].shape[-1]
    moment = torch.zeros(d, d, dtype=torch.float64, device=freqs.device)
    count = 0
    for chunk, other in zip(inputs, averaged):
        for x, y in zip(chunk.split(rows_per_step), other.split(rows_per_step)):
            probs = attention_probabilities(attn, x, freqs)  # (b, H, t, s)
            batch, heads, seq, _ = probs.shape
            means = (probs.to(y.dtype) @ y.unsqueeze(1)).reshape(-1, d).to(torch.float64)  # (b·H·t, d)
            moment += means.mT @ means / heads
            count += batch * seq
    return moment / count


def value_metric(
    sources: list[tuple[torch.nn.Module, list[torch.Tensor]]],
    averaged: list[torch.Tensor],
    whitening: Whitening,
    freqs: torch.Tensor,
    bias: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(M^½, M^-½)`` in the whitened coordinates of ``averaged``, for the source attention modules in
    ``sources`` (each with the inputs it reads; several when layers will share K/V, averaged)."""
    if bias:  # the new rows act on [x, 1]: average the constant coordinate too
        averaged = [torch.cat((x, torch.ones_like(x[..., :1])), dim=-1) for x in averaged]
    moment = sum(attention_moment(attn, inputs, freqs, averaged) for attn, inputs in sources) / len(sources)
    R_inv = whitening.R_inv.to(torch.float64)
    moment = R_inv.mT @ moment @ R_inv
    moment = (moment + moment.mT) / 2
    eye = torch.eye(len(moment), dtype=moment.dtype, device=moment.device)
    moment = (1 - BLEND) * moment / float(moment.diagonal().mean().clamp_min(1e-300)) + BLEND * eye
    evals, evecs = torch.linalg.eigh(moment)
    evals = evals.clamp_min(BLEND * 1e-3)
    return evecs @ torch.diag(evals.sqrt()) @ evecs.mT, evecs @ torch.diag(evals.rsqrt()) @ evecs.mT


def white_mean(chunks: list[torch.Tensor], whitening: Whitening, bias: bool) -> torch.Tensor:
    """``ū = E[u]`` of the whitened inputs ``u = R⁻ᵀ x`` as a row (``‖ū‖ < 1``)."""
    return flat_inputs(chunks, bias).mean(0) @ whitening.R_inv.to(torch.float64)


def to_metric(rows: torch.Tensor, mean: torch.Tensor | None) -> torch.Tensor:
    """``rows · (I - ū ūᵀ)^½``: the centered metric's square root is ``I - c ûûᵀ``, ``c = 1 - √(1-‖ū‖²)``."""
    if mean is None:
        return rows
    norm2 = min(float(mean @ mean), 1 - 1e-12)
    unit = mean / norm2**0.5
    return rows - (1 - (1 - norm2) ** 0.5) * (rows @ unit).unsqueeze(-1) * unit


def centered_readout(keys: torch.Tensor, basis: torch.Tensor, mean: torch.Tensor | None) -> torch.Tensor:
    """Least-squares coefficients of position-free ``keys`` (``(..., d)`` rows) on an orthonormal latent
    ``basis`` (``(r, d)``) under the centered metric ``C = I - ū ūᵀ``: ``K C Bᵀ (B C Bᵀ)⁻¹``."""
    if mean is None:
        return keys @ basis.mT
    b = basis @ mean
    projected = keys @ basis.mT - (keys @ mean).unsqueeze(-1) * b  # K C Bᵀ
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
