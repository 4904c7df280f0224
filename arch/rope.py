"""Rotary position embeddings (rotate-half layout, as HF Llama/Qwen/DeepSeek with rope_interleave=False).

Frequency scalings follow the papers and transformers' ``ROPE_INIT_FUNCTIONS`` (tests compare):
``linear`` (position interpolation), ``llama3`` (Llama-3.1 band-wise scaling) and ``yarn``
(NTK-by-parts with an attention factor, as DeepSeek-V2/V3 and Qwen long-context checkpoints use).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:  # annotations only: config.py imports the form registry, whose blocks import this module
    from .config import RopeScaling


def rope_frequencies(
    dim: int, theta: float, scaling: RopeScaling | None = None
) -> tuple[torch.Tensor, float]:
    """Inverse frequencies for ``dim`` rotated dims (``dim // 2`` pairs) and the cos/sin multiplier."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    if scaling is None:
        return inv_freq, 1.0
    if scaling.type == "linear":
        return inv_freq / scaling.factor, 1.0
    if scaling.type == "llama3":
        return _llama3(inv_freq, scaling), 1.0
    if scaling.type == "yarn":
        return _yarn(dim, theta, scaling)
    raise ValueError(f"rope_scaling.type={scaling.type!r}: allowed values are ['linear', 'llama3', 'yarn']")


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _llama3(inv_freq: torch.Tensor, scaling: RopeScaling) -> torch.Tensor:
    old_len = scaling.original_max_seq_len
    low_freq_wavelen = old_len / scaling.low_freq_factor
    high_freq_wavelen = old_len / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (old_len / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def _yarn(dim: int, theta: float, scaling: RopeScaling) -> tuple[torch.Tensor, float]:
    factor = scaling.factor
    attention_factor = scaling.attention_factor
    if attention_factor is None:
        if scaling.mscale and scaling.mscale_all_dim:
            attention_factor = yarn_mscale(factor, scaling.mscale) / yarn_mscale(
                factor, scaling.mscale_all_dim
            )
        else:
            attention_factor = yarn_mscale(factor)

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(scaling.original_max_seq_len / (rotations * 2 * math.pi))) / (
            2 * math.log(theta)
        )

    low, high = correction_dim(scaling.beta_fast), correction_dim(scaling.beta_slow)
    if scaling.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    extrapolation = 1 - ramp
    pos_freqs = theta ** (torch.arange(0, dim, 2).float() / dim)
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, float(attention_factor)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for a set of positions; one instance per distinct rotary width."""

    def __init__(self, dim: int, theta: float, scaling: RopeScaling | None = None) -> None:
        super().__init__()
        self.dim, self.theta, self.scaling = dim, theta, scaling
        self.register_buffer("inv_freq", torch.empty(dim // 2), persistent=False)
        self.attention_factor = 1.0
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """(Re)compute the frequencies; called again after meta-device initialisation."""
        inv_freq, self.attention_factor = rope_frequencies(self.dim, self.theta, self.scaling)
        with torch.no_grad():
            self.inv_freq.copy_(inv_freq)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``positions`` (seq,) or (batch, seq) → cos, sin of shape (…, seq, dim) in ``dtype``."""
        freqs = positions.to(torch.float32).unsqueeze(-1) * self.inv_freq.float()
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.attention_factor).to(dtype), (emb.sin() * self.attention_factor).to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x_bthd: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` (batch, seq, heads, dim) by cos/sin of shape (seq, dim) or (batch, seq, dim)."""
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    return x_bthd * cos + rotate_half(x_bthd) * sin
