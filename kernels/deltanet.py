"""The gated delta rule (Yang, Kautz & Hatamizadeh 2025, "Gated Delta Networks"; Qwen3-Next's linear
layers): a fixed-size state ``S`` (``dk × dv`` per head) written by a decayed delta rule,

    S_t = α_t (I - β_t k_t k_tᵀ) S_{t-1} + β_t k_t v_tᵀ,        o_t = S_tᵀ q_t · scale

with ``α_t = exp(g_t) ∈ (0, 1]`` a scalar gate per head and token and ``β_t ∈ (0, 1)`` the write
strength. Callers L2-normalise ``q`` and ``k`` (so ``I - β k kᵀ`` is a contraction).

Chunked form (the WY/UT representation of Yang et al. 2024, "Parallelizing Linear Transformers with the
Delta Rule over Sequence Length", as fla's ``chunk_gated_delta_rule`` and transformers'
``torch_chunk_gated_delta_rule``): within a chunk, with ``γ_i = Π_{r ≤ i} α_r`` and ``S_0`` the state
before it, the update is ``S_i = α_i S_{i-1} + k_i u_iᵀ`` with ``u_i = β_i (v_i - α_i S_{i-1}ᵀ k_i)``, so

    (I + A) u = β ⊙ v - (β γ ⊙ K) S_0,         A_ij = β_i (γ_i / γ_j) k_i·k_j  for j < i,

one unit-lower-triangular solve per chunk; then ``o_i = γ_i S_0ᵀ q_i + Σ_{j ≤ i} (γ_i/γ_j)(q_i·k_j) u_j``
and ``S_C = γ_C S_0 + Σ_j (γ_C/γ_j) k_j u_jᵀ``.

Query heads may outnumber state heads (``hq = hk · g``): query head ``h`` reads state ``h // g``, as GQA
reads K/V. Tensors are ``(batch, seq, heads, dim)``; ``g``/``beta`` are ``(batch, seq, hk)``. The
arithmetic is float32; outputs come back in the queries' dtype, states stay float32.
"""

from __future__ import annotations

import torch

DEFAULT_CHUNK = 64


def gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    *,
    scale: float | None = None,
    state: torch.Tensor | None = None,
    chunk_size: int = DEFAULT_CHUNK,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked parallel form: outputs ``(b, t, hq, dv)`` and the final state ``(b, hk, dk, dv)``."""
    _check(q, k, v, g, beta)
    batch, length, q_heads, dk = q.shape
    heads, dv = k.shape[2], v.shape[-1]
    group = q_heads // heads
    scale = dk**-0.5 if scale is None else scale
    s = _initial(state, batch, heads, dk, dv, q.device)
    # (b, hk, t, ·) float32, queries grouped (b, hk, group, t, dk)
    q_f = (q.float() * scale).unflatten(2, (heads, group)).permute(0, 2, 3, 1, 4)
    k_f, v_f = k.float().transpose(1, 2), v.float().transpose(1, 2)
    g_f, beta_f = g.float().transpose(1, 2), beta.float().transpose(1, 2)
    outputs = []
    for a in range(0, length, chunk_size):
        b = min(a + chunk_size, length)
        q_c, k_c, v_c = q_f[:, :, :, a:b], k_f[:, :, a:b], v_f[:, :, a:b]
        beta_c = beta_f[:, :, a:b].unsqueeze(-1)
        log_gamma = g_f[:, :, a:b].cumsum(-1)  # (b, hk, c)
        size = b - a
        lower = torch.ones(size, size, dtype=torch.bool, device=q.device).tril()
        # exp(G_i - G_j) for j <= i (<= 1, no overflow); zero above the diagonal
        decay = (log_gamma.unsqueeze(-1) - log_gamma.unsqueeze(-2)).masked_fill(~lower, float("-inf")).exp()
        strict = (beta_c * (k_c @ k_c.transpose(-1, -2)) * decay).tril(-1)
        unit_lower = strict + torch.eye(size, device=q.device)
        rhs = torch.cat((beta_c * v_c, beta_c * log_gamma.exp().unsqueeze(-1) * k_c), dim=-1)
        solved = torch.linalg.solve_triangular(unit_lower, rhs, upper=False, unitriangular=True)
        u = solved[..., :dv] - solved[..., dv:] @ s  # (b, hk, c, dv)
        gamma = log_gamma.exp()
        inter = (q_c * gamma[:, :, None, :, None]) @ s.unsqueeze(2)  # (b, hk, group, c, dv)
        intra = ((q_c @ k_c.unsqueeze(2).transpose(-1, -2)) * decay.unsqueeze(2)) @ u.unsqueeze(2)
        outputs.append(inter + intra)
        last = log_gamma[..., -1:]
        s = (
            s * last.exp().unsqueeze(-1)
            + (k_c * (last - log_gamma).exp().unsqueeze(-1)).transpose(-1, -2) @ u
        )
    out = torch.cat(outputs, dim=3) if outputs else q_f.new_zeros(batch, heads, group, 0, dv)
    return out.permute(0, 3, 1, 2, 4).flatten(2, 3).to(q.dtype), s


def gated_delta_rule_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    *,
    scale: float | None = None,
    state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Recurrent form for one token (``seq = 1``): ``(b, 1, hq, dv)`` and the new state."""
    _check(q, k, v, g, beta)
    if q.shape[1] != 1:
        raise ValueError(f"gated_delta_rule_step: one token at a time, got seq={q.shape[1]}")
    batch, _, q_heads, dk = q.shape
    heads, dv = k.shape[2], v.shape[-1]
    scale = dk**-0.5 if scale is None else scale
    s = _initial(state, batch, heads, dk, dv, q.device)
    k_t, v_t = k[:, 0].float(), v[:, 0].float()  # (b, hk, dk), (b, hk, dv)
    s = s * g[:, 0].float().exp()[..., None, None]
    delta = (v_t - torch.einsum("bhkv,bhk->bhv", s, k_t)) * beta[:, 0].float().unsqueeze(-1)
    s = s + k_t.unsqueeze(-1) * delta.unsqueeze(-2)
    q_t = (q[:, 0].float() * scale).unflatten(1, (heads, q_heads // heads))
    out = torch.einsum("bhgk,bhkv->bhgv", q_t, s).flatten(1, 2)
    return out.unsqueeze(1).to(q.dtype), s


def gated_delta_rule_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    *,
    scale: float | None = None,
    state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The recurrence of the module docstring, token by token (what the chunked form is tested against)."""
    outputs = []
    for t in range(q.shape[1]):
        span = slice(t, t + 1)
        out, state = gated_delta_rule_step(
            q[:, span], k[:, span], v[:, span], g[:, span], beta[:, span], scale=scale, state=state
        )
        outputs.append(out)
    return torch.cat(outputs, dim=1), state


def _initial(state, batch, heads, dk, dv, device) -> torch.Tensor:
    if state is None:
        return torch.zeros(batch, heads, dk, dv, device=device)
    if state.shape != (batch, heads, dk, dv):
        raise ValueError(f"gated delta rule: state {tuple(state.shape)} must be {(batch, heads, dk, dv)}")
    return state.float()


def _check(q, k, v, g, beta) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"gated delta rule: q, k, v must be (batch, seq, heads, dim), got {tuple(q.shape)}, "
            f"{tuple(k.shape)}, {tuple(v.shape)}"
        )
    if k.shape[:3] != v.shape[:3] or q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(
            f"gated delta rule: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} must share batch and "
            "seq, q/k their head dim, k/v their heads"
        )
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"gated delta rule: {k.shape[2]} state heads must divide {q.shape[2]} query heads")
    if g.shape != k.shape[:3] or beta.shape != k.shape[:3]:
        raise ValueError(
            f"gated delta rule: g {tuple(g.shape)} and beta {tuple(beta.shape)} must be (batch, seq, heads) "
            f"= {tuple(k.shape[:3])}"
        )
