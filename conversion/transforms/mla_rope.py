"""Which rotary pairs stay rotary when MHA/GQA becomes MLA, and what the others lose.

Stock DeepseekV3 derives its rotary frequencies from ``(rope_theta', qk_rope_head_dim)``: slot ``p``
of ``m`` rotates at ``θ'^(-p/m)``. The source's pair ``j`` rotates at ``θ^(-2j/head_dim)``, so the
kept pairs must be a progression ``{0, k, 2k, …, (m-1)k}``, mapped exactly by
``θ' = θ^(2km/head_dim)``; every selection strategy here therefore picks a step ``k``:

- ``high``: ``k = 1``, the ``m`` highest frequencies (MHA2MLA's S_high);
- ``uniform``: ``k = n_pairs // m``, frequencies spread evenly (S_uniform);
- ``contribution``: the step whose pairs lose the most when made position-free, measured on
  calibration attention (below); without calibration, by query-key weight norms (MHA2MLA's 2-norm).

A pair moved into the position-free (nope) part keeps its content but loses its rotation
``exp(1j·ω·Δ)``. The best fixed complex factor ``c`` replacing it for a head (folded into that
head's query) minimises ``Σ p(t,s)·|z|²·|exp(1j·ω·Δ) - c|²`` over the source attention ``p`` and
pair products ``z = q_t·conj(k_s)``: ``c = A / B`` with ``A = Σ p|z|² exp(1j·ω·Δ)``, ``B = Σ p|z|²``,
and ``B - |A|²/B`` is what the pair loses - its contribution score.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from kvforge.arch.rope import rope_frequencies

from .rotary import as_pairs

STRATEGIES = ("contribution", "high", "uniform")


@dataclass
class RopeStatistics:
    """Per layer, per query head and pair: ``A`` (complex) and ``B`` (real), see the module docstring."""

    A: torch.Tensor  # (n_heads, n_pairs) complex128
    B: torch.Tensor  # (n_heads, n_pairs) float64

    def phase_factors(self) -> torch.Tensor:
        """``c = A / B``: the fixed rotation-scaling that best replaces each pair's RoPE."""
        return torch.where(self.B > 0, self.A / self.B.clamp_min(1e-300), torch.ones_like(self.A))

    def loss_if_position_free(self) -> torch.Tensor:
        """``B - |A|²/B`` per (head, pair)."""
        return (self.B - self.A.abs() ** 2 / self.B.clamp_min(1e-300)).clamp_min(0)


@torch.no_grad()
def rope_statistics(
    attn: nn.Module, inputs: list[torch.Tensor], freqs: torch.Tensor, rows_per_step: int = 4
) -> RopeStatistics:
    """Accumulate :class:`RopeStatistics` of a GQA attention module over calibration inputs.

    ``|z|² = |q_t|²·|k_s|²``, so ``A = Σ_t |q_t|² e^{iωt} · Σ_s p(t,s)·|k_s|² e^{-iωs}``: one batched
    matrix product with the attention matrix per chunk, no ``(t, s, pair)`` temporaries."""
    n_heads, head_dim = attn.n_heads, attn.head_dim
    n_pairs = head_dim // 2
    device = freqs.device
    A = torch.zeros(n_heads, n_pairs, dtype=torch.complex128, device=device)
    B = torch.zeros(n_heads, n_pairs, dtype=torch.float64, device=device)
    freqs = freqs.to(torch.float32)
    for chunk in inputs:
        for x in chunk.split(rows_per_step):
            seq = x.shape[1]
            angle = torch.arange(seq, dtype=torch.float32, device=device).unsqueeze(-1) * freqs  # (seq, P)
            q, k, probs = _attention(attn, x, freqs, angle)
            q_power = q[..., :n_pairs] ** 2 + q[..., n_pairs:] ** 2  # |q_t|² per pair: (b, H, t, P)
            k_power = k[..., :n_pairs] ** 2 + k[..., n_pairs:] ** 2
            mixed = probs @ torch.cat((k_power * angle.cos(), k_power * angle.sin(), k_power), -1)
            k_cos, k_sin, k_sum = mixed.split(n_pairs, dim=-1)
            inner = torch.complex(k_cos, -k_sin) * torch.polar(q_power, angle.expand_as(q_power))
            A += inner.sum((0, 2)).to(torch.complex128)
            B += (q_power * k_sum).sum((0, 2)).to(torch.float64)
    return RopeStatistics(A, B)


def attention_probabilities(attn: nn.Module, x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """The softmax attention ``(batch, heads, t, s)`` of a GQA module (no q/k norm) on inputs ``x``."""
    angle = torch.arange(x.shape[1], dtype=torch.float32, device=x.device).unsqueeze(-1) * freqs.to(
        torch.float32
    )
    return _attention(attn, x, freqs, angle)[2]


def _attention(attn: nn.Module, x: torch.Tensor, freqs: torch.Tensor, angle: torch.Tensor):
    """Unrotated queries and keys ``(b, H, t, head_dim)`` (keys repeated per query head) and the
    attention probabilities of a GQA module on ``x``."""
    batch, seq, _ = x.shape
    n_heads, n_kv, head_dim = attn.n_heads, attn.n_kv_heads, attn.head_dim
    device = x.device
    q = attn.q_proj(x).view(batch, seq, n_heads, head_dim).transpose(1, 2)  # (b, H, t, dh)
    k = attn.k_proj(x).view(batch, seq, n_kv, head_dim).transpose(1, 2)
    k = k.repeat_interleave(n_heads // n_kv, dim=1)
    cos, sin = torch.cat((angle, angle), -1).cos(), torch.cat((angle, angle), -1).sin()
    scores = (_rotate(q, cos, sin) @ _rotate(k, cos, sin).mT) * attn.scale
    delta = torch.arange(seq, device=device).unsqueeze(1) - torch.arange(seq, device=device).unsqueeze(0)
    allowed = delta >= 0
    if attn.window is not None:
        allowed &= delta < attn.window
    probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
    return q, k, probs


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE in the rotate-half layout (as :func:`kvforge.arch.rope.apply_rope`, heads before seq)."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), -1) * sin


def weight_scores(attn: nn.Module) -> torch.Tensor:
    """Data-free pair scores ``‖q_{h,i}‖·‖k_{h,i}‖`` (MHA2MLA's 2-norm criterion): ``(n_heads, n_pairs)``."""
    q = as_pairs(attn.q_proj.weight, attn.n_heads).abs().pow(2).sum(-1).sqrt()
    k = as_pairs(attn.k_proj.weight, attn.n_kv_heads).abs().pow(2).sum(-1).sqrt()
    return q * k.repeat_interleave(attn.n_heads // attn.n_kv_heads, dim=0)


def progression(n_pairs: int, kept: int, step: int) -> list[int]:
    return [p * step for p in range(kept)]


def allowed_steps(n_pairs: int, kept: int) -> list[int]:
    """Steps ``k`` whose progression ``{0, k, …, (kept-1)k}`` fits in ``n_pairs`` pairs."""
    if kept == 1:
        return [1]
    return [step for step in range(1, n_pairs) if (kept - 1) * step < n_pairs]


def select_pairs(n_pairs: int, kept: int, strategy: str, scores: torch.Tensor | None) -> list[int]:
    """The kept source pairs (slot ``p`` ← pair ``result[p]``). ``scores``: ``(n_pairs,)``, higher =
    more worth keeping rotary (needed by ``contribution``)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"to_mla: rope_selection={strategy!r}: allowed values are {list(STRATEGIES)}")
    if not 1 <= kept <= n_pairs:
        raise ValueError(f"to_mla: {kept} rotary pairs requested; the source has {n_pairs} per head")
    steps = allowed_steps(n_pairs, kept)
    if strategy == "high":
        step = 1
    elif strategy == "uniform":
        step = max(s for s in steps if s <= max(1, n_pairs // kept))
    else:
        step = max(steps, key=lambda s: float(scores[progression(n_pairs, kept, s)].sum()))
    return progression(n_pairs, kept, step)


def exported_theta(source_theta: float, head_dim: int, pairs: list[int]) -> float:
    """``θ'`` for which DeepseekV3's slot frequencies equal the kept pairs' source frequencies."""
    if len(pairs) == 1:
        return source_theta
    step = pairs[1] - pairs[0]
    return float(source_theta ** (2 * step * len(pairs) / head_dim))


def check_exportable(source_freqs: torch.Tensor, pairs: list[int], theta: float, scaling=None) -> None:
    """The DeepseekV3 frequencies for ``theta`` (and the source's pointwise ``scaling``, linear or
    llama3, applied to them as to the source's) must equal the kept pairs' (no silent approximation)."""
    m = len(pairs)
    exported = rope_frequencies(2 * m, theta, scaling)[0].to(torch.float64)
    kept = source_freqs[pairs]
    if not torch.allclose(exported, kept, rtol=1e-6, atol=0):
        raise ValueError(
            f"to_mla: rotary pairs {pairs} (frequencies {kept.tolist()}) are not a progression that "
            f"DeepseekV3 can express with one rope_theta (got {exported.tolist()})"
        )


def describe(pairs: list[int], freqs: torch.Tensor) -> str:
    return ", ".join(
        f"{p} (ω={float(freqs[p]):.3g}, λ={2 * math.pi / float(freqs[p]):.3g} tokens)" for p in pairs
    )
