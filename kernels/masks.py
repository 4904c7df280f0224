"""Boolean attention masks for the KV-cache alignment every backend shares.

Queries are aligned to the *end* of the keys (the KV-cache convention flash-attn uses): with
``Lq`` queries and ``Lk`` keys, query ``i`` sits at position ``Lk - Lq + i`` and key ``j`` at ``j``.
A sliding window of ``W`` lets a query at ``p`` see the keys in ``(p - W, p]`` (``W`` tokens, itself
included), the convention of Mistral / Qwen2 ``sliding_window`` in transformers.
"""

from __future__ import annotations

import torch


def causal_window_mask(
    q_len: int, k_len: int, *, causal: bool, window: int | None, device: torch.device | str | None = None
) -> torch.Tensor | None:
    """``(q_len, k_len)`` keep-mask (True = may attend), or None when every key is visible."""
    if not causal and window is None:
        return None
    q_pos = torch.arange(k_len - q_len, k_len, device=device).unsqueeze(1)
    k_pos = torch.arange(k_len, device=device).unsqueeze(0)
    keep = k_pos <= q_pos
    if window is not None:
        keep = keep & (k_pos > q_pos - window)
    return keep


def length_mask(
    kv_lens: torch.Tensor, q_len: int, k_len: int, *, causal: bool, window: int | None
) -> torch.Tensor:
    """``(batch, 1, q_len, k_len)`` keep-mask over a fixed-size key buffer of which only the first
    ``kv_lens[b]`` slots are filled (a static cache). Queries align to the end of the *filled* keys:
    query ``i`` sits at position ``kv_lens[b] - q_len + i``. ``kv_lens`` is ``(batch,)`` or ``(1,)``."""
    k_pos = torch.arange(k_len, device=kv_lens.device).view(1, 1, 1, k_len)
    filled = kv_lens.view(-1, 1, 1, 1)
    keep = k_pos < filled
    q_pos = filled - q_len + torch.arange(q_len, device=kv_lens.device).view(1, 1, q_len, 1)
    if causal:
        keep = keep & (k_pos <= q_pos)
    if window is not None:
        keep = keep & (k_pos > q_pos - window)
    return keep


def chunk_mask(q_len: int, k_len: int, chunk: int, device: torch.device | str | None = None) -> torch.Tensor:
    """``(q_len, k_len)`` keep-mask of chunked local attention (Llama 4's ``attention_chunk_size``):
    key 0 starts a chunk and a query sees only the keys of its own chunk of ``chunk`` positions
    (AND it with the causal mask). Queries align to the end of the keys, as everywhere here."""
    q_pos = torch.arange(k_len - q_len, k_len, device=device).unsqueeze(1)
    k_pos = torch.arange(k_len, device=device).unsqueeze(0)
    return (k_pos // chunk) == (q_pos // chunk)


def needs_mask(q_len: int, k_len: int, *, causal: bool, window: int | None) -> bool:
    """False when causal/window hide nothing: a single last query over keys it can all see."""
    if not causal and window is None:
        return False
    if q_len == 1:
        return window is not None and k_len > window
    return True


def combine(keep: torch.Tensor | None, extra: torch.Tensor | None) -> torch.Tensor | None:
    """AND two broadcastable keep-masks, either of which may be None."""
    if keep is None:
        return extra
    if extra is None:
        return keep
    return keep & extra
