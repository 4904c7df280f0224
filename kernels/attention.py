"""One attention call for every backend.

Tensors are ``(batch, seq, heads, dim)``; K/V may have fewer heads than Q (GQA/MQA: ``n_kv_heads``
divides ``n_heads``, query head ``h`` reads KV head ``h // (n_heads // n_kv_heads)``) and V may have
a different head dim than Q/K (MLA's absorbed decode). Queries align to the end of the keys, see
:mod:`kvforge.kernels.masks`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from .eager import eager_attention
from .flash import BackendUnavailable, flash_attention, flash_available
from .sdpa import sdpa_attention

AttentionFn = Callable[..., torch.Tensor]

BACKENDS: dict[str, AttentionFn] = {
    "eager": eager_attention,
    "sdpa": sdpa_attention,
    "flash": flash_attention,
}


def register_backend(name: str, fn: AttentionFn) -> None:
    """Add a backend with the signature ``fn(q, k, v, *, causal, window, scale, mask)``."""
    BACKENDS[name] = fn


def available_backends() -> list[str]:
    names = ["auto", "eager", "sdpa"]
    if flash_available():
        names.append("flash")
    return names + [name for name in BACKENDS if name not in names and name != "flash"]


def resolve_backend(backend: str, q: torch.Tensor, mask: torch.Tensor | None) -> str:
    if backend != "auto":
        if backend not in BACKENDS:
            raise ValueError(f"backend={backend!r} is not one of {['auto', *BACKENDS]}")
        return backend
    if mask is None and q.device.type == "cuda" and q.dtype != torch.float32 and flash_available():
        return "flash"
    return "sdpa"


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = True,
    window: int | None = None,
    scale: float | None = None,
    mask: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Scaled dot-product attention; returns ``(batch, q_len, n_heads, v_head_dim)``.

    ``window`` W: a query at position p sees keys in ``(p - W, p]``. ``mask`` (bool, broadcastable to
    ``(batch, n_heads, q_len, k_len)``, True = may attend) is ANDed with ``causal``/``window``.
    """
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"q, k, v must be (batch, seq, heads, dim); got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    n_heads, n_kv_heads = q.shape[2], k.shape[2]
    if v.shape[2] != n_kv_heads or n_heads % n_kv_heads:
        raise ValueError(
            f"n_kv_heads={n_kv_heads} (v: {v.shape[2]}) must be equal for k and v and divide n_heads={n_heads}"
        )
    if causal and k.shape[1] < q.shape[1]:
        raise ValueError(
            f"causal attention needs at least as many keys ({k.shape[1]}) as queries ({q.shape[1]})"
        )
    if window is not None and (window <= 0 or not causal):
        raise ValueError(f"window={window} must be a positive int and needs causal=True")
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    name = resolve_backend(backend, q, mask)
    return BACKENDS[name](q, k, v, causal=causal, window=window, scale=scale, mask=mask)


__all__ = [
    "BACKENDS",
    "BackendUnavailable",
    "attention",
    "available_backends",
    "register_backend",
    "resolve_backend",
]
