"""Rotary projections seen as complex numbers: the only maps on keys that RoPE lets through.

In the rotate-half layout (HF Llama/DeepSeek with ``rope_interleave=False``), dims ``i`` and
``i + head_dim/2`` of a head form pair ``i``; RoPE multiplies the complex number
``z = x[i] + 1j·x[i + head_dim/2]`` by ``exp(1j·ω_i·t)``, and a query-key score is
``Σ_i Re(q_i · conj(k_i) · exp(1j·ω_i·(t - s)))``. A linear map on keys keeps every relative
position intact iff it commutes with all those rotations, i.e. iff it multiplies each pair by a
complex scalar (a 2×2 rotation-scaling), the same at every position; pairs of different
frequencies never mix. Everything here works on projection *rows* (functions of the input
``x``), so ``(heads, pairs, d_model)`` complex weights.
"""

from __future__ import annotations

import torch

from kvforge.arch import ModelConfig
from kvforge.arch.rope import rope_frequencies


def as_pairs(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """``(n_heads·head_dim, d)`` projection rows → ``(n_heads, head_dim/2, d)`` complex128 pair rows."""
    rows = weight.to(torch.float64).reshape(n_heads, -1, weight.shape[-1])
    half = rows.shape[1] // 2
    return torch.complex(rows[:, :half], rows[:, half:])


def from_pairs(pairs: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`as_pairs`: ``(n_heads, pairs, d)`` complex → ``(n_heads·2·pairs, d)`` float64."""
    return torch.cat((pairs.real, pairs.imag), dim=1).reshape(-1, pairs.shape[-1])


def scale_pairs(weight: torch.Tensor, n_heads: int, factors: torch.Tensor) -> torch.Tensor:
    """Multiply pair ``i`` of head ``h`` by the complex scalar ``factors[h, i]``: the RoPE-commuting
    map. Returns float64 rows in the layout of ``weight``."""
    return from_pairs(as_pairs(weight, n_heads) * factors.unsqueeze(-1))


def pair_frequencies(config: ModelConfig) -> torch.Tensor:
    """Angular frequency ``ω_i`` (radians per token) of each rotary pair of a GQA head."""
    inv_freq, _ = rope_frequencies(config.head_dim, config.rope_theta, config.rope_scaling)
    return inv_freq.to(torch.float64)
