"""Attention sinks: one learned logit per query head that takes part in the softmax but has no value
(gpt-oss; the fix StreamingLLM found for windowed attention). With scores ``s_j`` and sink ``σ``,

    out = Σ_j exp(s_j) v_j / (exp(σ) + Σ_j exp(s_j)) = out_plain · sigmoid(lse - σ),

where ``out_plain`` is ordinary attention and ``lse = log Σ_j exp(s_j)``. Three ways to compute it:
- ``eager`` appends the sink as one more score column (the reference, as transformers' gpt-oss does);
- ``flex`` asks its kernel for the log-sum-exp and rescales the output (:func:`rescale_by_lse`);
- every other backend that takes a mask (``sdpa``...) gets the *fold-in*: one extra key that every
  query sees, with a zero value, and one extra Q/K dim that gives that key the score ``σ_h`` -
  ``q' = [q, σ_h / scale]``, ``k' = [k, 0]`` for real keys and ``[0, 1]`` for the sink key.
  Causal/window alignment is lowered to an explicit mask first (the extra key shifts the keys).
The cache never holds a sink: it costs no KV bytes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .masks import causal_window_mask, combine


def check_sinks(sinks: torch.Tensor, n_heads: int) -> None:
    if sinks.dim() != 1 or sinks.shape[0] != n_heads:
        raise ValueError(
            f"sinks must be one logit per query head, shape ({n_heads},); got {tuple(sinks.shape)}"
        )


def append_sink_column(scores: torch.Tensor, sinks: torch.Tensor) -> torch.Tensor:
    """``scores`` ``(..., heads..., q_len, k_len)`` with the sink logit as one more key column;
    ``sinks`` already shaped to broadcast against ``scores[..., :1]``."""
    column = sinks.to(scores.dtype).expand(*scores.shape[:-1], 1)
    return torch.cat((scores, column), dim=-1)


def rescale_by_lse(out_bthd: torch.Tensor, lse_bht: torch.Tensor, sinks: torch.Tensor) -> torch.Tensor:
    """``out · sigmoid(lse - σ)`` (a query that sees no key has lse = -inf and gets zeros)."""
    weight = torch.sigmoid(lse_bht.float() - sinks.float().view(1, -1, 1))  # (batch, heads, q_len)
    return (out_bthd.float() * weight.transpose(1, 2).unsqueeze(-1)).to(out_bthd.dtype)


def fold_in_sinks(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    sinks: torch.Tensor,
    *,
    scale: float,
    causal: bool,
    window: int | None,
    mask: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v and a keep-mask with the sink as key 0 (see the module docstring); attend with
    ``causal=False, window=None`` and this mask, and keep the first ``v.shape[-1]`` output dims."""
    batch, q_len, n_heads, _ = q.shape
    k_len, n_kv_heads = k.shape[1], k.shape[2]
    keep = combine(causal_window_mask(q_len, k_len, causal=causal, window=window, device=q.device), mask)
    if keep is None:
        keep = torch.ones(1, 1, q_len, k_len, dtype=torch.bool, device=q.device)
    while keep.dim() < 4:
        keep = keep.unsqueeze(0)
    keep = torch.cat((keep.new_ones(*keep.shape[:-1], 1), keep), dim=-1)
    sink_q = (sinks.to(q.dtype) / scale).view(1, 1, n_heads, 1).expand(batch, q_len, n_heads, 1)
    q = torch.cat((q, sink_q), dim=-1)
    sink_k = F.pad(k.new_zeros(batch, 1, n_kv_heads, k.shape[-1]), (0, 1), value=1.0)
    k = torch.cat((sink_k, F.pad(k, (0, 1))), dim=1)
    v = torch.cat((v.new_zeros(batch, 1, n_kv_heads, v.shape[-1]), v), dim=1)
    if v.shape[-1] == q.shape[-1] - 1:  # keep Q/K and V of one width, as fused kernels need (zero column)
        v = F.pad(v, (0, 1))
    return q, k, v, keep
