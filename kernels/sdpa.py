"""``torch.nn.functional.scaled_dot_product_attention``: the default everywhere.

GQA/MQA go through ``enable_gqa=True`` (no repeated K/V copies). The causal flag is passed as
``is_causal`` only when queries and keys have the same length: SDPA aligns ``is_causal`` to the
top-left corner, which is wrong for a query block that follows cached keys, so that case gets an
explicit mask.

When V is narrower than Q/K (MLA: qk 192 vs v 128) torch's fused kernels refuse the shapes and SDPA
falls back to the math path, which materialises the (q_len × k_len) score matrix. Zero-padding the
narrower side to a common width keeps the fused, memory-linear path (padded V columns produce zero
output columns, padded Q/K columns add zero to every score; the scale is passed explicitly).
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
    qk_dim, v_dim = q.shape[-1], v.shape[-1]
    if v_dim < qk_dim:
        v = F.pad(v, (0, qk_dim - v_dim))
    elif v_dim > qk_dim:
        q, k = F.pad(q, (0, v_dim - qk_dim)), F.pad(k, (0, v_dim - qk_dim))
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        attn_mask=attn_mask,
        is_causal=is_causal,
        scale=scale,
        enable_gqa=n_heads != n_kv_heads,
    )
    return out.transpose(1, 2)[..., :v_dim]
