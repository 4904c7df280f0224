"""Small building blocks shared by every layer: RMSNorm, the gated MLP (HF Llama names; SwiGLU, or
GeGLU for Gemma), attention sinks and soft-capping."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """RMSNorm computed in float32 and cast back, as HF Llama/Qwen/DeepSeek do.

    ``unit_offset=True`` is Gemma's form: the scale is ``1 + weight`` (weight stored as the offset, zero
    at init) and the product is taken in float32 before the cast (``(x * (1 + w)).to(dtype)``, where
    Llama casts first), exactly as transformers' ``Gemma2RMSNorm``/``Gemma3RMSNorm``."""

    def __init__(self, dim: int, eps: float = 1e-6, unit_offset: bool = False) -> None:
        super().__init__()
        self.unit_offset = unit_offset
        self.weight = nn.Parameter(torch.zeros(dim) if unit_offset else torch.ones(dim))
        self.eps = eps

    def reset_parameters(self) -> None:
        (nn.init.zeros_ if self.unit_offset else nn.init.ones_)(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        if self.unit_offset:
            return (normed * (1.0 + self.weight.float())).to(x.dtype)
        return self.weight * normed.to(x.dtype)


# ModelConfig.mlp_activation -> function (transformers' ACT2FN: gelu_pytorch_tanh is torch's tanh gelu).
ACTIVATIONS = {
    "silu": F.silu,
    "gelu_pytorch_tanh": functools.partial(F.gelu, approximate="tanh"),
    "gelu": F.gelu,
}


class SwiGLU(nn.Module):
    """``down_proj(act(gate_proj(x)) * up_proj(x))``: SwiGLU with silu, GeGLU with gelu (Gemma)."""

    def __init__(self, d_model: int, ffn_dim: int, activation: str = "silu") -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation={activation!r}: allowed values are {sorted(ACTIVATIONS)}")
        self.act = ACTIVATIONS[activation]
        self.gate_proj = nn.Linear(d_model, ffn_dim, bias=False)
        self.up_proj = nn.Linear(d_model, ffn_dim, bias=False)
        self.down_proj = nn.Linear(ffn_dim, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


def softcap(x: torch.Tensor, cap: float | None) -> torch.Tensor:
    """``cap · tanh(x / cap)`` (Gemma 2's logit soft-capping); ``cap=None`` leaves ``x`` as it is."""
    return x if cap is None else torch.tanh(x / cap) * cap


def new_sinks(n_heads: int) -> nn.Parameter:
    """One sink logit per query head (gpt-oss's ``self_attn.sinks``), zero at init: exp(0) = 1 is one
    token's worth of mass - small next to a context, and the same start for every head."""
    return nn.Parameter(torch.zeros(n_heads))
