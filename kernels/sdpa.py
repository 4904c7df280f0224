"""``torch.nn.functional.scaled_dot_product_attention``: the default everywhere.

GQA/MQA go through ``enable_gqa=True`` (no repeated K/V copies). The causal flag is passed as
``is_causal`` only when queries and keys have the same length: SDPA aligns ``is_causal`` to the
top-left corner, which is wrong for a query block that follows cached keys, so that case gets an
explicit mask.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .masks import causal_window_mask, combine, needs_mask


def sdpa_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    window: int | None,
    scale: float,
    mask: torch.Tensor | None,
) -> torch.Tensor:
    q_len, n_heads = q.shape[1], q.shape[2]
    k_len, n_kv_heads = k.shape[1], k.shape[2]
    is_causal = False
    attn_mask = mask
    if needs_mask(q_len, k_len, causal=causal, window=window):
        if mask is None and window is None and q_len == k_len:
            is_causal = True
        else:
            keep = causal_window_mask(q_len, k_len, causal=causal, window=window, device=q.device)
            attn_mask = combine(keep, mask)
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        attn_mask=attn_mask,
        is_causal=is_causal,
        scale=scale,
        enable_gqa=n_heads != n_kv_heads,
    )
    return out.transpose(1, 2)
