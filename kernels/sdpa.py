"""``torch.nn.functional.scaled_dot_product_attention``, with torch's own kernel choice (``sdpa``) or a
forced one (``sdpa-cudnn``, ``sdpa-flash``, ``sdpa-efficient``, ``sdpa-math``).

torch's default order is not the fastest everywhere: on Hopper its cuDNN kernel is about twice as fast
as its built-in FlashAttention-2 (docs/results.md, "SDPA kernels on Hopper"), so ``auto`` names the
kernel from a measured table instead of trusting the default. GQA/MQA go through ``enable_gqa=True`` (no
repeated K/V copies). ``is_causal`` is passed only when queries and keys have the same length: SDPA
aligns it to the top-left corner, wrong for a query block that follows cached keys, so that case
gets an explicit mask.

When V is narrower than Q/K (MLA: qk 192 vs v 128) torch's fused kernels refuse the shapes and SDPA
falls back to the math path, which materialises the (q_len × k_len) score matrix. Zero-padding the
narrower side to a common width keeps the fused, memory-linear path (padded V columns produce zero
output columns, padded Q/K columns add zero to every score; the scale is passed explicitly). A single
query (decode) is not padded: its score row is small, while padding would copy the whole cache.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from .errors import BackendUnavailable
from .masks import causal_window_mask, combine, needs_mask

SDPA_KERNELS = {
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "math": SDPBackend.MATH,
}
# Kernels torch ships for each device type (a forced kernel outside these cannot run at all).
SDPA_KERNELS_BY_DEVICE = {"cuda": ("cudnn", "flash", "efficient", "math"), "cpu": ("flash", "math")}


def sdpa_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    window: int | None,
    scale: float,
    mask: torch.Tensor | None,
    kernel: str | None = None,
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
    v_dim = v.shape[-1]
    if q_len > 1:
        q, k, v = _common_width(q, k, v)
    args = (q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    kwargs = dict(attn_mask=attn_mask, is_causal=is_causal, scale=scale, enable_gqa=n_heads != n_kv_heads)
    if kernel is None:
        out = F.scaled_dot_product_attention(*args, **kwargs)
    else:
        try:
            with sdpa_kernel([SDPA_KERNELS[kernel]]):
                out = F.scaled_dot_product_attention(*args, **kwargs)
        except RuntimeError as err:  # torch says "No available kernel" and why in its warnings
            raise BackendUnavailable(
                f"backend='sdpa-{kernel}' cannot run these inputs (device {q.device.type}, {q.dtype}, "
                f"head_dim {q.shape[-1]}/{v_dim}, {n_heads}/{n_kv_heads} heads, "
                f"mask={'yes' if attn_mask is not None else 'no'}): {str(err).splitlines()[0]}"
            ) from err
    return out.transpose(1, 2)[..., :v_dim]


def _common_width(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """Zero-pad V or Q/K so that all three have the same head dim (see the module docstring)."""
    qk_dim, v_dim = q.shape[-1], v.shape[-1]
    if v_dim < qk_dim:
        v = F.pad(v, (0, qk_dim - v_dim))
    elif v_dim > qk_dim:
        q, k = F.pad(q, (0, v_dim - qk_dim)), F.pad(k, (0, v_dim - qk_dim))
    return q, k, v


def forced_sdpa(kernel: str):
    """``sdpa_attention`` pinned to one of torch's kernels."""
    return functools.partial(sdpa_attention, kernel=kernel)


def sdpa_kernel_unavailable(kernel: str, q: torch.Tensor) -> str | None:
    """Why ``sdpa-<kernel>`` can never run on ``q``'s device (None if it may)."""
    allowed = SDPA_KERNELS_BY_DEVICE.get(q.device.type, ("math",))
    if kernel not in allowed:
        return f"torch has no {kernel} SDPA kernel on {q.device.type} (there: {list(allowed)})"
    if kernel in ("cudnn", "flash") and q.device.type == "cuda" and q.dtype == torch.float32:
        return f"the {kernel} SDPA kernel needs float16/bfloat16 inputs, got float32"
    return None
