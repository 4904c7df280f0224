"""Reference attention: plain matmuls in float32, readable and slow. Every other backend is tested
against this one."""

from __future__ import annotations

import torch

from .masks import causal_window_mask, combine
from .sinks import append_sink_column


def eager_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    window: int | None,
    scale: float,
    mask: torch.Tensor | None,
    sinks: torch.Tensor | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    batch, q_len, n_heads, _ = q.shape
    k_len, n_kv_heads = k.shape[1], k.shape[2]
    group = n_heads // n_kv_heads
    # Query head h reads KV head h // group (transformers' repeat_kv order) - grouped by a view, no copy.
    q_bkgqd = q.float().view(batch, q_len, n_kv_heads, group, -1).permute(0, 2, 3, 1, 4)
    k_bksd = k.float().transpose(1, 2)
    v_bksd = v.float().transpose(1, 2)
    scores = torch.einsum("bkgqd,bksd->bkgqs", q_bkgqd, k_bksd) * scale
    if softcap is not None:  # Gemma 2: cap the scaled scores before the mask, as transformers does
        scores = torch.tanh(scores / softcap) * softcap

    keep = causal_window_mask(q_len, k_len, causal=causal, window=window, device=q.device)
    if mask is not None:
        mask = mask.expand(batch, n_heads, q_len, k_len).reshape(batch, n_kv_heads, group, q_len, k_len)
    keep = combine(keep, mask)
    if keep is not None:
        scores = scores.masked_fill(~keep, float("-inf"))
    if sinks is not None:  # one more column per head that absorbs probability and has no value
        scores = append_sink_column(scores, sinks.float().view(1, n_kv_heads, group, 1, 1))
    probs = torch.softmax(scores, dim=-1)
    if sinks is not None:
        probs = probs[..., :-1]
    if keep is not None:  # a query that may see nothing gets zeros, not NaN
        probs = probs.nan_to_num(0.0)
    out = torch.einsum("bkgqs,bksd->bkgqd", probs, v_bksd)
    return out.permute(0, 3, 1, 2, 4).reshape(batch, q_len, n_heads, -1).to(q.dtype)
