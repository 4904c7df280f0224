"""flash-attn (Dao-AILab) when it is installed on a CUDA machine: native GQA, bottom-right causal
alignment, ``window_size``, varlen for packed documents and ``cache_seqlens`` for static caches.
Imported lazily so that kvforge never needs it (``pip install kvforge[flash]``).

FlashAttention-3 (``flash_attn_interface``, Hopper) is preferred when present, else FlashAttention-2
(``flash_attn``); both take ``(batch, seq, heads, dim)`` like kvforge.
"""

from __future__ import annotations

import functools
import importlib.util
from types import SimpleNamespace

import torch

from .documents import document_cu_seqlens
from .errors import BackendUnavailable

# flash-attn 2 kernels exist for these head dims only (K and V of the same width).
FLASH_MAX_HEAD_DIM = 256


@functools.cache
def _flash_module() -> SimpleNamespace:
    try:  # FlashAttention-3 (Hopper): same call shapes, may also return the log-sum-exp
        import flash_attn_interface as module
    except ImportError:
        try:
            import flash_attn as module
        except ImportError as err:
            raise BackendUnavailable(
                "backend='flash' needs the flash-attn package: `pip install kvforge[flash]` on a CUDA "
                "machine (or use backend='sdpa', which runs everywhere)"
            ) from err
    return SimpleNamespace(
        func=module.flash_attn_func,
        varlen=module.flash_attn_varlen_func,
        with_kvcache=module.flash_attn_with_kvcache,
    )


# Checked once, without importing it (a CUDA import is slow; dynamo must not trace it).
FLASH_INSTALLED = any(importlib.util.find_spec(name) for name in ("flash_attn_interface", "flash_attn"))


def flash_available() -> bool:
    return FLASH_INSTALLED and torch.cuda.is_available()


def flash_unavailable(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str | None:
    """Why flash-attn cannot run these inputs (None if it can)."""
    if q.device.type != "cuda":
        return f"backend='flash' runs on CUDA tensors only, got device {q.device.type!r}"
    if q.dtype not in (torch.float16, torch.bfloat16):
        return f"backend='flash' needs float16 or bfloat16 inputs, got {q.dtype}"
    if k.shape[-1] != v.shape[-1] or k.shape[-1] > FLASH_MAX_HEAD_DIM:
        return f"backend='flash' needs equal K/V head dims ≤ {FLASH_MAX_HEAD_DIM}, got {k.shape[-1]}/{v.shape[-1]}"
    if not flash_available():
        return "the flash-attn package is not installed"
    return None


def _first(out):
    return out[0] if isinstance(out, tuple) else out  # FA3 returns (out, lse)


def flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    window: int | None,
    scale: float,
    mask: torch.Tensor | None,
    document_ids: torch.Tensor | None = None,
    kv_lens: torch.Tensor | None = None,
) -> torch.Tensor:
    reason = flash_unavailable(q, k, v)
    if reason is not None:
        raise BackendUnavailable(reason)
    if mask is not None:
        raise BackendUnavailable("backend='flash' takes no explicit mask; use backend='sdpa' or 'flex'")
    flash = _flash_module()
    window_size = (window - 1, 0) if window is not None else (-1, -1)
    if kv_lens is not None:  # static cache: only the first kv_lens[b] slots are filled
        cache_seqlens = kv_lens.to(torch.int32).expand(q.shape[0]).contiguous()
        out = flash.with_kvcache(
            q, k, v, cache_seqlens=cache_seqlens, softmax_scale=scale, causal=causal, window_size=window_size
        )
        return _first(out)
    if document_ids is not None:  # packed documents: one varlen sequence per document
        batch, seq, n_heads, _ = q.shape
        cu_seqlens, max_len = document_cu_seqlens(document_ids)
        out = flash.varlen(
            q.reshape(batch * seq, n_heads, -1),
            k.reshape(batch * seq, k.shape[2], -1),
            v.reshape(batch * seq, v.shape[2], -1),
            cu_seqlens_q=cu_seqlens,
            cu_seqlens_k=cu_seqlens,
            max_seqlen_q=max_len,
            max_seqlen_k=max_len,
            softmax_scale=scale,
            causal=causal,
            window_size=window_size,
        )
        return _first(out).view(batch, seq, n_heads, -1)
    return _first(flash.func(q, k, v, softmax_scale=scale, causal=causal, window_size=window_size))
