"""One attention call for every backend.

Tensors are ``(batch, seq, heads, dim)``; K/V may have fewer heads than Q (GQA/MQA: ``n_kv_heads``
divides ``n_heads``, query head ``h`` reads KV head ``h // (n_heads // n_kv_heads)``) and V may have
a different head dim than Q/K (MLA's absorbed decode). Queries align to the end of the keys, see
:mod:`kvforge.kernels.masks`.

Backends: ``eager`` (reference), ``sdpa`` (torch's choice of kernel) and ``sdpa-cudnn`` /
``sdpa-flash`` / ``sdpa-efficient`` / ``sdpa-math`` (one forced kernel), ``flex`` (FlexAttention block
masks), ``flash`` (flash-attn), ``triton`` (split-KV decode), and ``auto`` (see :mod:`.auto`).
"""

from __future__ import annotations

import math

import torch

from .auto import attention_case, last_resort, note_runtime_failure, resolve_auto
from .backends import BACKENDS, AttentionFn, Backend, available_backends, register_backend, softcap_backends
from .documents import check_document_ids, document_mask
from .errors import BackendUnavailable
from .masks import chunk_mask, combine, length_mask
from .sinks import check_sinks, fold_in_sinks


def _features(mask, document_ids, kv_lens, sinks=None, chunk=None, softcap=None) -> frozenset[str]:
    given = {
        "mask": mask,
        "documents": document_ids,
        "kv_lens": kv_lens,
        "sinks": sinks,
        "chunk": chunk,
        "softcap": softcap,
    }
    return frozenset(name for name, value in given.items() if value is not None)


def resolve_backend(
    backend: str,
    q: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    k: torch.Tensor | None = None,
    v: torch.Tensor | None = None,
    causal: bool = True,
    window: int | None = None,
    document_ids: torch.Tensor | None = None,
    kv_lens: torch.Tensor | None = None,
    sinks: torch.Tensor | None = None,
    chunk: int | None = None,
    softcap: float | None = None,
) -> str:
    """The backend name a call would run on (``auto`` resolved)."""
    if backend != "auto":
        if backend not in BACKENDS:
            raise ValueError(f"backend={backend!r} is not one of {['auto', *BACKENDS]}")
        return backend
    k = q if k is None else k
    v = k if v is None else v
    return resolve_auto(
        q,
        k,
        v,
        _case(q, k, causal, window, mask, document_ids, chunk),
        _features(mask, document_ids, kv_lens, sinks, chunk, softcap),
    )


def _case(q, k, causal, window, mask, document_ids, chunk=None) -> str:
    return attention_case(
        q.shape[1],
        k.shape[1],
        causal=causal,
        window=window,
        has_mask=mask is not None or chunk is not None,
        has_documents=document_ids is not None,
    )


def _validate(q, k, v, causal, window, document_ids, kv_lens, sinks=None, chunk=None, softcap=None) -> None:
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap={softcap!r} must be a positive number (cap · tanh(score / cap)) or None")
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
    if document_ids is not None:
        check_document_ids(document_ids, q.shape[1], k.shape[1], q.shape[0])
    if kv_lens is not None:
        if document_ids is not None:
            raise ValueError("kv_lens (a static cache) and document_ids (packed training) do not combine")
        if kv_lens.dim() != 1 or kv_lens.shape[0] not in (1, q.shape[0]):
            raise ValueError(f"kv_lens must be (batch,) or (1,); got {tuple(kv_lens.shape)}")
    if sinks is not None:
        check_sinks(sinks, n_heads)
    if chunk is not None:
        if chunk <= 0 or not causal:
            raise ValueError(f"chunk={chunk} must be a positive int and needs causal=True")
        if kv_lens is not None:
            raise ValueError(
                "chunk and kv_lens do not combine: a static chunk cache restarts per chunk, so its filled "
                "slots are the query's chunk already (pass chunk=None)"
            )


def _run(
    backend: Backend,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    window: int | None,
    scale: float,
    mask: torch.Tensor | None,
    document_ids: torch.Tensor | None,
    kv_lens: torch.Tensor | None,
    sinks: torch.Tensor | None = None,
    chunk: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Lower what ``backend`` does not handle natively to a boolean mask (sinks: one extra key),
    then call it."""
    native: dict[str, torch.Tensor | float] = {}
    v_dim = v.shape[-1]
    if softcap is not None:  # a nonlinearity of the scores: no mask or extra key can stand in for it
        if "softcap" not in backend.native:
            raise BackendUnavailable(
                f"backend={backend.name!r} cannot apply attention-logit soft-capping (softcap={softcap}); "
                f"use one of {softcap_backends()} or 'auto'"
            )
        native["softcap"] = softcap
    if chunk is not None:
        mask = combine(chunk_mask(q.shape[1], k.shape[1], chunk, device=q.device), mask)
    if document_ids is not None:
        if "documents" in backend.native:
            native["document_ids"] = document_ids
        else:
            mask = combine(document_mask(document_ids), mask)
    if kv_lens is not None:
        if "kv_lens" in backend.native:
            native["kv_lens"] = kv_lens
        else:  # the length mask already aligns queries to the last filled key and applies the window
            mask = combine(length_mask(kv_lens, q.shape[1], k.shape[1], causal=causal, window=window), mask)
            causal, window = False, None
    if sinks is not None:
        if "sinks" in backend.native:
            native["sinks"] = sinks
        elif not backend.takes_mask:
            raise BackendUnavailable(
                f"backend={backend.name!r} cannot apply attention sinks; use 'eager', 'sdpa' or 'flex'"
            )
        else:
            q, k, v, mask = fold_in_sinks(
                q, k, v, sinks, scale=scale, causal=causal, window=window, mask=mask
            )
            causal, window = False, None
    if mask is not None and not backend.takes_mask:
        raise BackendUnavailable(
            f"backend={backend.name!r} takes no explicit mask (this call has one); use 'sdpa' or 'flex'"
        )
    reason = backend.unavailable(q, k, v)
    if reason is not None:
        raise BackendUnavailable(reason)
    out = backend.fn(q, k, v, causal=causal, window=window, scale=scale, mask=mask, **native)
    return out[..., :v_dim]


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
    document_ids: torch.Tensor | None = None,
    kv_lens: torch.Tensor | None = None,
    sinks: torch.Tensor | None = None,
    chunk: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Scaled dot-product attention; returns ``(batch, q_len, n_heads, v_head_dim)``.

    ``window`` W: a query at position p sees keys in ``(p - W, p]``. ``mask`` (bool, broadcastable to
    ``(batch, n_heads, q_len, k_len)``, True = may attend) is ANDed with ``causal``/``window``.
    ``document_ids`` ``(batch, seq)``: packed documents (see :mod:`.documents`); no query sees a key
    of another document. ``kv_lens`` ``(batch,)`` or ``(1,)``: only the first ``kv_lens[b]`` key slots
    are filled (a static cache buffer); queries then align to the last *filled* key.
    ``sinks`` ``(n_heads,)``: a learned logit per query head that absorbs probability mass (gpt-oss,
    see :mod:`.sinks`). ``chunk`` C: chunked local attention - key 0 starts a chunk and a query sees
    only the keys of its own chunk of C positions (Llama 4's ``attention_chunk_size``). ``softcap`` c:
    scaled scores become ``c · tanh(score / c)`` before masking and softmax (Gemma 2); only backends
    that apply it natively run such a call (``auto`` routes to them, a named other backend refuses).
    An explicitly named backend that cannot run the call raises :class:`BackendUnavailable`; ``auto``
    never does (it falls back, saying so once).
    """
    _validate(q, k, v, causal, window, document_ids, kv_lens, sinks, chunk, softcap)
    # A cache stored narrower than the model (``--cache-dtype bf16`` under fp32) is read in the queries' dtype.
    k, v = (t if t.dtype == q.dtype else t.to(q.dtype) for t in (k, v))
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    kwargs = dict(
        causal=causal,
        window=window,
        scale=scale,
        mask=mask,
        document_ids=document_ids,
        kv_lens=kv_lens,
        sinks=sinks,
        chunk=chunk,
        softcap=softcap,
    )
    if backend != "auto":
        return _run(BACKENDS[resolve_backend(backend, q)], q, k, v, **kwargs)
    case = _case(q, k, causal, window, mask, document_ids, chunk)
    features = _features(mask, document_ids, kv_lens, sinks, chunk, softcap)
    while True:
        name = resolve_auto(q, k, v, case, features)
        try:
            return _run(BACKENDS[name], q, k, v, **kwargs)
        except BackendUnavailable as err:
            if name == last_resort(features):
                raise
            note_runtime_failure(name, q, k, v, case, err)


__all__ = [
    "BACKENDS",
    "AttentionFn",
    "BackendUnavailable",
    "attention",
    "available_backends",
    "register_backend",
    "resolve_backend",
]
