"""Linear attention with a learned feature map, optionally with a sliding softmax window in the same layer.

The feature map is Hedgehog's (Zhang et al. 2024, "The Hedgehog & the Porcupine"), as LoLCATs uses it
(Zhang et al. 2025, "LoLCATs: On Low-Rank Linearizing of Large Language Models"): a learned per-head
projection ``W`` (``head_dim × F``) and ``φ(x) = [softmax(xW), softmax(-xW)]`` (``2F`` features, both
signs, so ``φ(q)·φ(k)`` can follow ``exp(q·k)`` on both sides of zero). Its softmax keeps features
positive and bounded (``0 < φ(q)·φ(k) ≤ 2``), so the normaliser never vanishes or overflows.

With a window ``W`` (LoLCATs' "sliding window + linear"), query ``t`` attends to its ``W`` nearest keys
``(t - W, t]`` with softmax weights and to every older key with linear weights, in one normaliser:

    y_t = (Σ_win γ_h exp(s_tj - m_t) v_j + Σ_{j ≤ t-W} φ(q_t)·φ(k_j) v_j)
          / (Σ_win γ_h exp(s_tj - m_t)   + Σ_{j ≤ t-W} φ(q_t)·φ(k_j))

with ``s_tj = q_t·k_j · scale``, ``m_t`` the largest window score of query ``t`` (LoLCATs' stabiliser: it
fixes the scale of the softmax terms per query) and ``γ_h`` a learned positive weight per head.
``window = 0`` is plain linear attention over every key ``j ≤ t``.

The state is fixed-size: ``kv = Σ φ(k_j) v_jᵀ`` (``2F × dv`` per head) and ``k_sum = Σ φ(k_j)``
(``2F``) over the keys that left the window, plus the last ``W - 1`` raw keys and values (the caller's
ring). Tensors are ``(batch, seq, heads, dim)``; K/V may have fewer heads than Q (query head ``h``
reads K/V head ``h // (heads / kv_heads)``), but features ``fk`` are per *query* head (each query head
has its own key map, as LoLCATs repeats K/V before the map), so the state is per query head.
Everything runs in float32; outputs come back in the queries' dtype, states stay float32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

DEFAULT_CHUNK = 64
EPS = 1e-12  # keeps a plain linear normaliser positive when every feature product underflows


@dataclass
class LinearState:
    """``kv`` ``(batch, heads, features, dv)`` and ``k_sum`` ``(batch, heads, features)``, float32."""

    kv: torch.Tensor
    k_sum: torch.Tensor

    @classmethod
    def zeros(cls, batch: int, heads: int, features: int, dv: int, device=None) -> LinearState:
        return cls(
            torch.zeros(batch, heads, features, dv, device=device),
            torch.zeros(batch, heads, features, device=device),
        )


def hedgehog_features(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``[softmax(xW + b), softmax(-(xW + b))]`` per head: ``x`` ``(b, t, h, d)``, ``weight`` ``(h, d, F)``,
    ``bias`` ``(h, F)`` → ``(b, t, h, 2F)`` float32."""
    projected = torch.einsum("bthd,hdf->bthf", x.float(), weight.float())
    if bias is not None:
        projected = projected + bias.float()
    return torch.cat((projected.softmax(-1), (-projected).softmax(-1)), dim=-1)


def linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    fq: torch.Tensor,
    fk: torch.Tensor,
    *,
    window: int = 0,
    window_weight: torch.Tensor | None = None,
    scale: float | None = None,
    state: LinearState | None = None,
    chunk_size: int = DEFAULT_CHUNK,
) -> tuple[torch.Tensor, LinearState]:
    """Chunked parallel form. ``q`` ``(b, n, h, d)`` and ``fq`` ``(b, n, h, F)`` are the last ``n`` of the
    ``m`` positions of ``k`` ``(b, m, hk, d)``, ``v`` ``(b, m, hk, dv)`` and ``fk`` ``(b, m, h, F)``
    (queries align to the end of the keys); ``state`` holds the keys before ``k[:, 0]``.

    Returns the output ``(b, n, h, dv)`` and the state over keys ``0 .. m - max(window - 1, 0) - 1``: the
    caller keeps the last ``window - 1`` raw keys and values for the next call's window.
    """
    _check(q, k, v, fq, fk, window)
    batch, n, heads, _ = q.shape
    m, kv_heads, dv = k.shape[1], k.shape[2], v.shape[-1]
    group = heads // kv_heads
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if state is None:
        state = LinearState.zeros(batch, heads, fq.shape[-1], dv, q.device)
    # grouped views: query head h = (kv head h // group, member h % group)
    q_g = q.float().unflatten(2, (kv_heads, group))
    fq_g = fq.float().unflatten(2, (kv_heads, group))
    fk_g = fk.float().unflatten(2, (kv_heads, group))
    v_f, k_f = v.float(), k.float()
    sums = [state.kv.unflatten(1, (kv_heads, group)), state.k_sum.unflatten(1, (kv_heads, group))]
    weight = _window_weight(window_weight, heads, q.device).view(kv_heads, group)

    def absorb(start: int, end: int) -> None:  # keys start..end-1 enter the linear state (new tensors:
        if end > start:  # autograd keeps the old ones for the chunks that read them)
            sums[0] = sums[0] + torch.einsum("bjkgf,bjkv->bkgfv", fk_g[:, start:end], v_f[:, start:end])
            sums[1] = sums[1] + fk_g[:, start:end].sum(1)

    first = m - n
    covered = max(first - window, 0)
    absorb(0, covered)  # keys older than every query's window (when the caller passes more than W - 1)
    outputs = []
    for a in range(first, m, chunk_size):
        b = min(a + chunk_size, m)
        fq_c = fq_g[:, a - first : b - first]
        numerator = torch.einsum("bqkgf,bkgfv->bqkgv", fq_c, sums[0])
        denominator = torch.einsum("bqkgf,bkgf->bqkg", fq_c, sums[1])
        lo, hi = max(a - window, 0), max(b - window, 0)  # keys active (j <= t - window) for some query
        if hi > lo:
            t = torch.arange(a, b, device=q.device).view(-1, 1)
            j = torch.arange(lo, hi, device=q.device).view(1, -1)
            weights = torch.einsum("bqkgf,bjkgf->bqkgj", fq_c, fk_g[:, lo:hi])
            weights = weights * (j <= t - window).view(1, b - a, 1, 1, hi - lo)
            numerator = numerator + torch.einsum("bqkgj,bjkv->bqkgv", weights, v_f[:, lo:hi])
            denominator = denominator + weights.sum(-1)
        if window:
            lo = max(a - window + 1, 0)
            t = torch.arange(a, b, device=q.device).view(-1, 1)
            j = torch.arange(lo, b, device=q.device).view(1, -1)
            inside = ((j <= t) & (j > t - window)).view(1, b - a, 1, 1, b - lo)
            scores = torch.einsum("bqkgd,bjkd->bqkgj", q_g[:, a - first : b - first], k_f[:, lo:b]) * scale
            scores = scores.masked_fill(~inside, float("-inf"))
            soft = weight.view(1, 1, kv_heads, group, 1) * torch.exp(scores - scores.amax(-1, keepdim=True))
            numerator = numerator + torch.einsum("bqkgj,bjkv->bqkgv", soft, v_f[:, lo:b])
            denominator = denominator + soft.sum(-1)
        outputs.append(numerator / denominator.clamp_min(EPS).unsqueeze(-1))
        absorb(covered, max(b - window, 0))
        covered = max(covered, b - window)
    absorb(covered, m - max(window - 1, 0))
    out = torch.cat(outputs, dim=1).flatten(2, 3).to(q.dtype)
    return out, LinearState(sums[0].flatten(1, 2), sums[1].flatten(1, 2))


def linear_attention_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    fq: torch.Tensor,
    fk: torch.Tensor,
    *,
    window: int = 0,
    window_weight: torch.Tensor | None = None,
    scale: float | None = None,
    state: LinearState,
    valid: torch.Tensor | None = None,
    absorb: torch.Tensor | bool | None = None,
) -> tuple[torch.Tensor, LinearState]:
    """Recurrent form for one new token. ``q``/``fq`` ``(b, 1, h, ·)``; ``k``/``v`` ``(b, m, hk, ·)`` are the
    window's keys ending with the new one (``m ≤ window``; for ``window = 0`` just the new key) and ``fk``
    ``(b, 1, h, F)`` the features of ``k[:, 0]``, which enters the state: before the output when
    ``window = 0``, after it when ``absorb`` (default: the window is full, ``m = window``).
    Fixed-shape decoding passes all ``window`` slots with ``valid`` ``(m,)`` marking the ones that hold a
    token and ``absorb`` as a 0/1 tensor, so that nothing depends on a host-side count.
    Returns ``(b, 1, h, dv)`` and the new state."""
    _check(q, k, v, fq, fk, window)
    heads, kv_heads = q.shape[2], k.shape[2]
    group, m = heads // kv_heads, k.shape[1]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if m > max(window, 1):
        raise ValueError(f"linear_attention_step: {m} keys for a window of {window} (at most max(window, 1))")
    kv, k_sum = state.kv, state.k_sum
    v_h = v.float().repeat_interleave(group, dim=2)  # (b, m, h, dv): a step is small, copies are cheap
    enters = fk[:, 0].float()  # (b, h, F)
    if window == 0:
        kv, k_sum = kv + enters.unsqueeze(-1) * v_h[:, 0].unsqueeze(-2), k_sum + enters
    fq_h = fq[:, 0].float()
    numerator = torch.einsum("bhf,bhfv->bhv", fq_h, kv)
    denominator = torch.einsum("bhf,bhf->bh", fq_h, k_sum)
    if window:
        k_h = k.float().repeat_interleave(group, dim=2)
        scores = torch.einsum("bhd,bjhd->bhj", q[:, 0].float(), k_h) * scale
        if valid is not None:
            scores = scores.masked_fill(~valid.view(1, 1, m), float("-inf"))
        soft = _window_weight(window_weight, heads, q.device).view(1, heads, 1) * torch.exp(
            scores - scores.amax(-1, keepdim=True)
        )
        numerator = numerator + torch.einsum("bhj,bjhv->bhv", soft, v_h)
        denominator = denominator + soft.sum(-1)
        absorb = m == window if absorb is None else absorb
        if isinstance(absorb, torch.Tensor):  # 0/1 on the device: always add, maybe nothing
            enters = enters * absorb.float()
        if isinstance(absorb, torch.Tensor) or absorb:  # the oldest key leaves the window for good
            kv, k_sum = kv + enters.unsqueeze(-1) * v_h[:, 0].unsqueeze(-2), k_sum + enters
    out = numerator / denominator.clamp_min(EPS).unsqueeze(-1)
    return out.unsqueeze(1).to(q.dtype), LinearState(kv, k_sum)


def linear_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    fq: torch.Tensor,
    fk: torch.Tensor,
    *,
    window: int = 0,
    window_weight: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """The formula of the module docstring as one masked ``(n, m)`` weight matrix per head (queries at the
    end of the keys, no earlier state): what the chunked and recurrent forms are tested against."""
    _check(q, k, v, fq, fk, window)
    heads, kv_heads = q.shape[2], k.shape[2]
    group, n, m = heads // kv_heads, q.shape[1], k.shape[1]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    k_h = k.float().repeat_interleave(group, dim=2)
    v_h = v.float().repeat_interleave(group, dim=2)
    t = torch.arange(m - n, m).view(-1, 1)
    j = torch.arange(m).view(1, -1)
    linear = torch.einsum("bqhf,bjhf->bhqj", fq.float(), fk.float()) * (j <= t - window)
    weights = linear
    if window:
        inside = (j <= t) & (j > t - window)
        scores = torch.einsum("bqhd,bjhd->bhqj", q.float(), k_h) * scale
        scores = scores.masked_fill(~inside, float("-inf"))
        gamma = _window_weight(window_weight, heads, q.device).view(1, heads, 1, 1)
        weights = weights + gamma * torch.exp(scores - scores.amax(-1, keepdim=True))
    out = (
        torch.einsum("bhqj,bjhv->bqhv", weights, v_h)
        / weights.sum(-1).clamp_min(EPS).transpose(1, 2)[..., None]
    )
    return out.to(q.dtype)


def _window_weight(weight: torch.Tensor | None, heads: int, device) -> torch.Tensor:
    return torch.ones(heads, device=device) if weight is None else weight.float().reshape(heads)


def _check(q, k, v, fq, fk, window: int) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"linear attention: q, k, v must be (batch, seq, heads, dim), got {tuple(q.shape)}, "
            f"{tuple(k.shape)}, {tuple(v.shape)}"
        )
    if q.shape[2] % k.shape[2] or k.shape[:3] != v.shape[:3]:
        raise ValueError(
            f"linear attention: {k.shape[2]} K/V heads must divide {q.shape[2]} query heads and match V "
            f"({tuple(k.shape)} vs {tuple(v.shape)})"
        )
    if fq.shape[:3] != q.shape[:3] or fk.shape[2] != q.shape[2] or fq.shape[-1] != fk.shape[-1]:
        raise ValueError(
            f"linear attention: features fq {tuple(fq.shape)} / fk {tuple(fk.shape)} must be per query head "
            f"with one width (queries {tuple(q.shape)})"
        )
    if not isinstance(window, int) or isinstance(window, bool) or window < 0:
        raise ValueError(f"linear attention: window={window!r} must be an int >= 0 (0 = no softmax window)")
