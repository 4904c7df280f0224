"""Whitened input coordinates: where every least-squares fit of a projection becomes an SVD.

With ``E[x xᵀ] = Rᵀ R`` over the calibration inputs ``x`` of a layer, ``u = R⁻ᵀ x`` has identity
covariance, so the expected squared error of any linear function ``a·x`` is ``‖a Rᵀ‖²``. Without
calibration ``R = I`` and the same code works on the weights alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .common import StateDict
from .merge import HeadTargets
from .rotary import as_pairs


@dataclass
class Whitening:
    """``E[x xᵀ] = Rᵀ R`` (a small ridge keeps rank-deficient inputs solvable)."""

    R: torch.Tensor
    R_inv: torch.Tensor

    @classmethod
    def from_gram(cls, gram: torch.Tensor, ridge: float = 1e-9) -> Whitening:
        gram = gram.to(torch.float64)
        eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
        R = torch.linalg.cholesky(gram + ridge * gram.diagonal().mean().clamp_min(1e-30) * eye).mT
        return cls(R, torch.linalg.inv(R))

    @classmethod
    def identity(cls, dim: int) -> Whitening:
        eye = torch.eye(dim, dtype=torch.float64)
        return cls(eye, eye)

    def rows_to_white(self, rows: torch.Tensor) -> torch.Tensor:
        """Projection rows on ``x`` → coefficients on ``u`` (``a·x = (a Rᵀ)·u``)."""
        return rows @ self.R.mT.to(rows.device, rows.dtype)

    def rows_from_white(self, coefs: torch.Tensor) -> torch.Tensor:
        """Coefficients on ``u`` → projection rows on ``x``."""
        return coefs @ self.R_inv.mT.to(coefs.device, coefs.dtype)


def head_targets(
    attn: torch.nn.Module, whitening: Whitening, source_whitening: Whitening, cross: torch.Tensor | None
) -> HeadTargets:
    """Per query head: its key pairs, query energies, value rows (whitened) and ``O_hᵀ O_h``.

    ``cross`` = ``E[x_new x_srcᵀ]`` when the new projections read other inputs than the source ones
    (sequential calibration); the targets are then regressed onto the new inputs."""
    n_heads, n_kv, head_dim = attn.n_heads, attn.n_kv_heads, attn.head_dim
    rep = n_heads // n_kv

    def white(rows: torch.Tensor) -> torch.Tensor:
        if cross is None:
            return whitening.rows_to_white(rows)
        return rows @ cross.mT.to(rows.device, rows.dtype) @ whitening.R_inv.to(rows.device, rows.dtype)

    kv_of = torch.arange(n_heads) // rep
    keys = white(as_pairs(rows_with_bias(attn.k_proj), n_kv))[kv_of]
    queries = source_whitening.rows_to_white(as_pairs(rows_with_bias(attn.q_proj), n_heads))
    values = white(rows_with_bias(attn.v_proj).to(torch.float64)).reshape(n_kv, head_dim, -1)[kv_of]
    o_blocks = attn.o_proj.weight.to(torch.float64).reshape(-1, n_heads, head_dim).permute(1, 0, 2)
    return HeadTargets(
        key=keys,
        key_weight=(queries.abs() ** 2).sum(-1),
        value=values,
        out_gram=o_blocks.mT @ o_blocks,
    )


def layer_whitening(ctx, bias: bool, dim: int) -> tuple[Whitening, Whitening, torch.Tensor | None]:
    """Whitening of the new inputs, of the source inputs, and their cross moment (``None`` when the
    new projections read the source inputs)."""
    if ctx.inputs is None:
        return Whitening.identity(dim + bias), Whitening.identity(dim + bias), None
    new_x, src_x = flat_inputs(ctx.inputs, bias), flat_inputs(ctx.source_inputs, bias)
    whitening = Whitening.from_gram(new_x.mT @ new_x / len(new_x))
    if ctx.inputs is ctx.source_inputs:
        return whitening, whitening, None
    source = Whitening.from_gram(src_x.mT @ src_x / len(src_x))
    return whitening, source, new_x.mT @ src_x / len(new_x)


def rows_with_bias(linear: torch.nn.Linear) -> torch.Tensor:
    """Rows ``[W | b]`` acting on ``[x, 1]`` (just ``W`` without a bias), float64."""
    weight = linear.weight.to(torch.float64)
    if linear.bias is None:
        return weight
    return torch.cat((weight, linear.bias.to(torch.float64).unsqueeze(-1)), dim=-1)


def split_bias(name: str, rows: torch.Tensor, bias: bool) -> StateDict:
    if not bias:
        return {f"{name}.weight": rows}
    return {f"{name}.weight": rows[:, :-1], f"{name}.bias": rows[:, -1]}


def flat_inputs(chunks: list[torch.Tensor], bias: bool) -> torch.Tensor:
    x = torch.cat([c.reshape(-1, c.shape[-1]) for c in chunks]).to(torch.float64)
    return torch.cat((x, torch.ones_like(x[:, :1])), dim=1) if bias else x
