"""Sources with per-head q/k RMSNorm (Qwen3): what the linear transforms can do through the norm.

Qwen3 computes ``q = g_q ⊙ y/rms(y)`` with ``y = W_q,h x`` per head before RoPE (keys alike, ``g_k``
shared by the heads), so keys are not linear in the input and the complex per-pair scales of the
aligned merge (:mod:`.merge`) cannot move into the query. A map on ``y`` passes through the norm and
RoPE unchanged iff it keeps ``rms(y)``, commutes with ``diag(g)`` and with every rotation: for gains
that differ within a pair (the generic case), a sign ``±1`` per rotary pair. Hence:

- aligned GQA (:func:`merge_signed`): each head's key rows are normalised by ``σ_h``, the head's RMS
  on the calibration inputs (its weights' RMS without calibration), aligned to the group's heaviest
  head by a sign per pair, and averaged (weighted by query energy); ``k_norm`` stays on the merged
  head and the signs move into the query rows (before ``q_norm``: exact). Copies of one head merge
  exactly; anything else is approximate, the norm being nonlinear.
- MLA (:func:`linearised`): ``diag(g) W_h / σ_h`` stands in for each normalised projection (exact
  when ``rms(W_h x)`` is the same at every token; approximate otherwise), and the norms go.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from .merge import HeadTargets


def norm_gain(norm: nn.Module) -> torch.Tensor:
    """The per-dim scale an RMSNorm applies after normalising (``1 + w`` in Gemma's form), float64."""
    weight = norm.weight.detach().to(torch.float64)
    return 1 + weight if getattr(norm, "unit_offset", False) else weight


def pair_gain(gain: torch.Tensor) -> torch.Tensor:
    """Mean squared gain of each rotary pair (dims ``i`` and ``i + head_dim/2``): ``(head_dim/2,)``."""
    half = gain.shape[0] // 2
    return (gain[:half] ** 2 + gain[half:] ** 2) / 2


@dataclass
class NormalisedTargets(HeadTargets):
    """:class:`.merge.HeadTargets` with keys divided by each head's RMS ``σ_h`` (``key_rms``)."""

    key_rms: torch.Tensor  # (n_q,)


def normalised_targets(targets: HeadTargets, attn: nn.Module) -> NormalisedTargets:
    """``targets`` with every head's key divided by its RMS ``σ_h`` (the scale ``k_norm`` removes) and
    key weights that are the *normalised* query energies times the key gain: the score error of a
    pre-norm key error ``e`` is then ``Σ_i w_{h,i} |e_i|²`` (``σ`` in whitened coordinates is exact:
    ``E‖W_h x‖² = ‖κ_h‖²``)."""
    head_dim = attn.head_dim
    key_rms = ((targets.key.abs() ** 2).sum((-1, -2)) / head_dim).sqrt().clamp_min(1e-30)  # (n_q,)
    query_rms = (targets.key_weight.sum(-1) / head_dim).sqrt().clamp_min(1e-30)
    query_energy = targets.key_weight / query_rms.unsqueeze(-1) ** 2 * pair_gain(norm_gain(attn.q_norm))
    return NormalisedTargets(
        key=targets.key / key_rms.view(-1, 1, 1),
        key_weight=query_energy * pair_gain(norm_gain(attn.k_norm)).to(query_energy.device),
        value=targets.value,
        out_gram=targets.out_gram,
        key_rms=key_rms,
    )


def merge_signed(targets: NormalisedTargets, heads) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Per pair, the query-energy-weighted mean of the heads' normalised keys, each aligned to the
    heaviest head's by a sign, back at the heads' mean RMS (``k_norm``'s eps is then where it was: copies
    of one head merge bit-exactly). Returns the merged key ``(pairs, d)`` complex, the signs
    ``(len(heads), pairs)`` (as complex ±1, the form :func:`.rotary.scale_pairs` takes) and the
    weighted squared error ``Σ w |s·κ_h - key|²``."""
    heads = list(heads)
    weight = targets.key_weight[heads].clamp_min(1e-30)  # (n, pairs)
    members = targets.key[heads]  # (n, pairs, d)
    heaviest = (weight * (members.abs() ** 2).sum(-1)).argmax(0)  # (pairs,)
    anchor = members[heaviest, torch.arange(members.shape[1], device=members.device)]  # (pairs, d)
    agreement = (members * anchor.conj()).sum(-1).real  # (n, pairs)
    signs = torch.where(agreement < 0, -1.0, 1.0).to(torch.float64)
    aligned = signs.unsqueeze(-1) * members
    key = (weight.unsqueeze(-1) * aligned).sum(0) / weight.sum(0).unsqueeze(-1)
    error = float((weight * ((aligned - key).abs() ** 2).sum(-1)).sum())
    return key * targets.key_rms[heads].mean(), signs.to(torch.complex128), error


def signed_group_cost(targets: HeadTargets, heads, value_dim: int, totals: tuple[float, float]) -> float:
    """:func:`.merge.group_cost` for sign-aligned keys: relative key error + relative value error."""
    _, _, key_error = merge_signed(targets, heads)
    _, value_error = targets.merge_errors(heads, value_dim)
    return key_error / max(totals[0], 1e-30) + value_error / max(totals[1], 1e-30)


@torch.no_grad()
def linearised(attn: nn.Module, inputs: list[torch.Tensor] | None) -> nn.Module:
    """A copy of a GQA attention module with ``q_norm``/``k_norm`` replaced by their linear stand-ins:
    ``q_proj``/``k_proj`` rows (and biases) of head ``h`` become ``diag(g) [W_h | b_h] / σ_h``, with
    ``σ_h`` the head's RMS on ``inputs`` (on unit-covariance inputs, i.e. the weights' RMS, without).
    ``attn`` is left untouched."""
    if attn.q_norm is None:
        return attn
    stand_in = copy.copy(attn)
    stand_in._modules = dict(attn._modules)
    for name, norm, heads in (
        ("q_proj", attn.q_norm, attn.n_heads),
        ("k_proj", attn.k_norm, attn.n_kv_heads),
    ):
        stand_in._modules[name] = _scaled_projection(getattr(attn, name), norm, heads, inputs)
    stand_in._modules["q_norm"] = stand_in._modules["k_norm"] = None
    return stand_in


def _scaled_projection(linear: nn.Linear, norm: nn.Module, heads: int, inputs) -> nn.Linear:
    weight = linear.weight.detach().to(torch.float64)
    bias = linear.bias.detach().to(torch.float64) if linear.bias is not None else None
    head_dim = weight.shape[0] // heads
    if inputs is None:
        energy = weight.reshape(heads, -1).pow(2).sum(-1)
        if bias is not None:
            energy = energy + bias.reshape(heads, -1).pow(2).sum(-1)
        rms = (energy / head_dim).sqrt()
    else:
        total, count = torch.zeros(heads, dtype=torch.float64, device=weight.device), 0
        for chunk in inputs:
            y = linear(chunk).reshape(-1, heads, head_dim).to(torch.float64)
            total += y.pow(2).sum((0, 2))
            count += y.shape[0]
        rms = (total / max(count, 1) / head_dim).sqrt()
    scale = norm_gain(norm).to(weight.device).repeat(heads) / rms.clamp_min(1e-30).repeat_interleave(head_dim)
    out = nn.Linear(linear.in_features, linear.out_features, bias=bias is not None)
    out = out.to(device=weight.device, dtype=linear.weight.dtype).requires_grad_(False)
    out.weight.copy_(weight * scale.unsqueeze(-1))
    if bias is not None:
        out.bias.copy_(bias * scale)
    return out
