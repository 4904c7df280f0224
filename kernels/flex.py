"""FlexAttention (``torch.nn.attention.flex_attention``): one compiled kernel for causal, sliding-window
and packed-document masks, with block sparsity - blocks a mask hides entirely are never computed.

- structural masks (causal, window) depend on the shape only: their block masks are cached per shape;
- document masks depend on the data: built once per ``document_ids`` tensor (every layer of a forward
  pass gets the same tensor, so the 2nd..Lth layer reuse the first one's);
- a static cache's fill lengths (``kv_lens``) and explicit masks become a ``score_mod``, so the block
  structure, and with it a captured CUDA graph, never changes.

On CUDA the kernel is ``torch.compile``d once; elsewhere flex runs eagerly (a dense reference, slow).
"""

from __future__ import annotations

import functools
import weakref

import torch
from torch.nn.attention.flex_attention import AuxRequest, create_block_mask, flex_attention

from .errors import BackendUnavailable
from .log import log_once
from .sinks import rescale_by_lse

NEG_INF = float("-inf")


@functools.cache
def _compiled_flex():
    return torch.compile(flex_attention, dynamic=False)


def _flex_fn(device: torch.device):
    if torch.compiler.is_compiling():  # inside a compiled model: dynamo compiles flex with it
        return flex_attention
    if device.type == "cuda":
        return _compiled_flex()
    log_once(
        f"flex-eager-{device.type}",
        f"backend='flex' on {device.type} runs eagerly (a dense reference, not a fast path); "
        "use backend='sdpa' there",
    )
    return flex_attention


def flex_unavailable(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str | None:
    """Why flex cannot run these inputs (None if it can)."""
    if q.device.type == "cpu" and torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        return "backend='flex' has no backward pass on CPU (torch limitation); use backend='sdpa' there"
    return None


def _structural_mask_mod(q_len: int, k_len: int, causal: bool, window: int | None):
    offset = k_len - q_len  # queries align to the end of the keys

    def mask_mod(b, h, q_idx, kv_idx):
        keep = kv_idx <= q_idx + offset if causal else kv_idx >= 0
        if window is not None:
            keep = keep & (kv_idx > q_idx + offset - window)
        return keep

    return mask_mod


@functools.lru_cache(maxsize=64)
def structural_block_mask(q_len: int, k_len: int, causal: bool, window: int | None, device: str):
    mask_mod = _structural_mask_mod(q_len, k_len, causal, window)
    return create_block_mask(
        mask_mod, None, None, q_len, k_len, device=device, _compile=device.startswith("cuda")
    )


class _DocumentMaskCache:
    """The block mask of the last ``document_ids`` tensor seen (held weakly, keyed by identity and
    in-place version, so a new batch - even at the same address - is never served a stale mask)."""

    def __init__(self) -> None:
        self.key: tuple | None = None
        self.tensor_ref = None
        self.block_mask = None

    def get(self, document_ids: torch.Tensor, causal: bool, window: int | None):
        key = (document_ids._version, causal, window)
        if self.tensor_ref is not None and self.tensor_ref() is document_ids and self.key == key:
            return self.block_mask
        seq = document_ids.shape[1]
        structural = _structural_mask_mod(seq, seq, causal, window)

        def mask_mod(b, h, q_idx, kv_idx):
            return structural(b, h, q_idx, kv_idx) & (document_ids[b, q_idx] == document_ids[b, kv_idx])

        device = document_ids.device
        self.block_mask = create_block_mask(
            mask_mod, document_ids.shape[0], None, seq, seq, device=device, _compile=device.type == "cuda"
        )
        self.tensor_ref, self.key = weakref.ref(document_ids), key
        return self.block_mask


_document_masks = _DocumentMaskCache()


def _masking_score_mod(
    batch: int,
    q_len: int,
    causal: bool,
    window: int | None,
    kv_lens: torch.Tensor | None,
    mask: torch.Tensor | None,
):
    """A score_mod that sets hidden scores to -inf: fill lengths (queries aligned to the last filled
    key) and/or an explicit boolean mask already expanded to ``(batch, heads, q_len, k_len)``."""
    lens = None if kv_lens is None else kv_lens.expand(batch)

    def score_mod(score, b, h, q_idx, kv_idx):
        keep = kv_idx >= 0
        if kv_lens is not None:
            filled = lens[b]
            q_pos = filled - q_len + q_idx
            keep = keep & (kv_idx < filled)
            if causal:
                keep = keep & (kv_idx <= q_pos)
            if window is not None:
                keep = keep & (kv_idx > q_pos - window)
        if mask is not None:
            keep = keep & mask[b, h, q_idx, kv_idx]
        return torch.where(keep, score, NEG_INF)

    return score_mod


def _softcap_score_mod(cap: float, then):
    """``cap · tanh(score / cap)`` on the (already scaled) score, then ``then`` (masking) if given."""

    def score_mod(score, b, h, q_idx, kv_idx):
        capped = torch.tanh(score / cap) * cap
        return capped if then is None else then(capped, b, h, q_idx, kv_idx)

    return score_mod


def flex_attention_fn(
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
    sinks: torch.Tensor | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    batch, q_len, n_heads, _ = q.shape
    k_len = k.shape[1]
    if not torch.is_grad_enabled():  # flex refuses CPU inputs that require grad even under no_grad
        q, k, v = q.detach(), k.detach(), v.detach()
    block_mask, score_mod = None, None
    if kv_lens is None:
        if document_ids is not None:
            block_mask = _document_masks.get(document_ids, causal, window)
        elif causal or window is not None:
            block_mask = structural_block_mask(q_len, k_len, causal, window, str(q.device))
    if kv_lens is not None or mask is not None:
        full_mask = None if mask is None else mask.expand(batch, n_heads, q_len, k_len)
        score_mod = _masking_score_mod(batch, q_len, causal, window, kv_lens, full_mask)
    if softcap is not None:
        score_mod = _softcap_score_mod(softcap, score_mod)
    try:
        out = _flex_fn(q.device)(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            score_mod=score_mod,
            block_mask=block_mask,
            scale=scale,
            enable_gqa=n_heads != k.shape[2],
            # sinks: out · sigmoid(lse - sink) from the kernel's own log-sum-exp (kernels/sinks.py)
            return_aux=AuxRequest(lse=True) if sinks is not None else None,
        )
    except torch._dynamo.exc.TorchDynamoException as err:  # e.g. head dims its kernel does not support
        raise BackendUnavailable(
            f"backend='flex' could not compile for head dims {q.shape[-1]}/{v.shape[-1]}: {str(err).splitlines()[0]}"
        ) from err
    if sinks is not None:
        out, aux = out
        return rescale_by_lse(out.transpose(1, 2), aux.lse, sinks)
    return out.transpose(1, 2)
