"""flash-attn (Dao-AILab) when it is installed on a CUDA machine: native GQA, bottom-right causal
alignment and ``window_size``. Imported lazily so that kvforge never needs it."""

from __future__ import annotations

import functools

import torch


class BackendUnavailable(RuntimeError):
    """The requested attention backend cannot run here (missing package or device)."""


@functools.cache
def _flash_attn_func():
    try:
        from flash_attn import flash_attn_func
    except ImportError as err:
        raise BackendUnavailable(
            "backend='flash' needs the flash-attn package: `pip install kvforge[flash]` on a CUDA machine "
            "(or use backend='sdpa', which runs everywhere)"
        ) from err
    return flash_attn_func


def flash_available() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        _flash_attn_func()
    except BackendUnavailable:
        return False
    return True


def flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    window: int | None,
    scale: float,
    mask: torch.Tensor | None,
) -> torch.Tensor:
    if q.device.type != "cuda":
        raise BackendUnavailable(f"backend='flash' runs on CUDA tensors only, got device {q.device.type!r}")
    if q.dtype not in (torch.float16, torch.bfloat16):
        raise BackendUnavailable(f"backend='flash' needs float16 or bfloat16 inputs, got {q.dtype}")
    if mask is not None:
        raise BackendUnavailable("backend='flash' takes no explicit mask; use backend='sdpa' or 'flex'")
    window_size = (window - 1, 0) if window is not None else (-1, -1)
    return _flash_attn_func()(q, k, v, softmax_scale=scale, causal=causal, window_size=window_size)
