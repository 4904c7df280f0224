"""Decode attention in Triton: one query token per sequence over a (static) KV cache, split-KV
("flash-decoding": each program owns a slice of the keys, a second kernel merges the slices by their
log-sum-exp), all query heads of a KV group in one program so every cached row is read once.

The same kernel serves GQA/MQA (K and V tensors per KV head) and absorbed MLA decode: there the cache
row ``[c | k_pe]`` (``kv_lora_rank + rope`` wide) is the single key shared by every head and its first
``kv_lora_rank`` columns are the value. When V is a prefix view of K's storage the kernel reuses the
key tile as the value tile (``V_FROM_K``), so the latent is read from memory once per step - the reason
MLA's smaller cache can decode faster than GQA.

Importing this module needs ``triton``; on CPU the kernels run in Triton's interpreter
(``TRITON_INTERPRET=1``, set before the first import - tests only).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

# Programs per SM the key splits aim for: enough to hide memory latency when batch × heads is small.
PROGRAMS_PER_SM = 2
MAX_SPLITS = 64


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    # fp32 inputs (tests): exact products; bf16/fp16: tensor cores as usual.
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _split_kernel(
    Q, K, V, KV_LENS, OUT_PART, LSE_PART,
    stride_qb, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_lens,
    stride_ob, stride_oh, stride_os,
    stride_lb, stride_lh,
    scale, window, n_splits,
    GROUP: tl.constexpr, HEAD_BLOCKS: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D1: tl.constexpr, BLOCK_D2: tl.constexpr, BLOCK_DV: tl.constexpr,
    V_FROM_K: tl.constexpr, IEEE: tl.constexpr,
):  # fmt: skip
    batch = tl.program_id(0)
    kv_head = tl.program_id(1) // HEAD_BLOCKS
    split = tl.program_id(2)
    head_in_group = (tl.program_id(1) % HEAD_BLOCKS) * BLOCK_H + tl.arange(0, BLOCK_H)
    head_ok = head_in_group < GROUP
    heads = kv_head * GROUP + head_in_group

    # The filled slots are [0, kv_len); a window keeps the last `window` of them. Splits divide the
    # *visible* range at run time, so a short context in a long static buffer still uses every split.
    kv_len = tl.load(KV_LENS + batch * stride_lens).to(tl.int32)
    lo = tl.where(window > 0, tl.maximum(kv_len - window, 0), 0)
    per_split = tl.cdiv(tl.cdiv(kv_len - lo, n_splits), BLOCK_N) * BLOCK_N
    start = lo + split * per_split
    end = tl.minimum(start + per_split, kv_len)

    d1 = tl.arange(0, BLOCK_D1)
    q_rows = Q + batch * stride_qb + heads[:, None] * stride_qh
    q1 = tl.load(q_rows + d1[None, :], mask=head_ok[:, None] & (d1[None, :] < DK), other=0.0)
    if BLOCK_D2 > 0:  # key dims past the largest power of two (MLA: the 64 rotary dims after 512)
        d2 = BLOCK_D1 + tl.arange(0, BLOCK_D2)
        q2 = tl.load(q_rows + d2[None, :], mask=head_ok[:, None] & (d2[None, :] < DK), other=0.0)
    dv = tl.arange(0, BLOCK_DV)
    k_rows = K + batch * stride_kb + kv_head * stride_kh
    v_rows = V + batch * stride_vb + kv_head * stride_vh

    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_DV], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < end
        k1 = tl.load(
            k_rows + offs_n[:, None] * stride_ks + d1[None, :],
            mask=n_ok[:, None] & (d1[None, :] < DK),
            other=0.0,
        )
        scores = _dot(q1, tl.trans(k1), IEEE)
        if BLOCK_D2 > 0:
            k2 = tl.load(
                k_rows + offs_n[:, None] * stride_ks + d2[None, :],
                mask=n_ok[:, None] & (d2[None, :] < DK),
                other=0.0,
            )
            scores += _dot(q2, tl.trans(k2), IEEE)
        # Under torch.compile, Inductor hands a float argument over as fp64: keep the running max in fp32.
        scores = tl.where(n_ok[None, :], (scores * scale).to(tl.float32), float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(scores - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if V_FROM_K:
            values = k1
        else:
            values = tl.load(
                v_rows + offs_n[:, None] * stride_vs + dv[None, :],
                mask=n_ok[:, None] & (dv[None, :] < DV),
                other=0.0,
            )
        acc = acc * alpha[:, None] + _dot(p.to(values.dtype), values, IEEE)
        m_i = m_new

    filled = l_i > 0
    out = acc / tl.where(filled, l_i, 1.0)[:, None]
    lse = tl.where(filled, m_i + tl.log(tl.where(filled, l_i, 1.0)), float("-inf"))  # empty split: weight 0
    out_ptrs = OUT_PART + batch * stride_ob + heads[:, None] * stride_oh + split * stride_os + dv[None, :]
    tl.store(out_ptrs, out, mask=head_ok[:, None] & (dv[None, :] < DV))
    tl.store(LSE_PART + batch * stride_lb + heads * stride_lh + split, lse, mask=head_ok)


@triton.jit
def _merge_kernel(
    OUT_PART, LSE_PART, OUT,
    stride_pb, stride_ph, stride_ps,
    stride_lb, stride_lh,
    stride_ob, stride_oh,
    n_splits,
    DV: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_DV: tl.constexpr,
):  # fmt: skip
    batch = tl.program_id(0)
    head = tl.program_id(1)
    splits = tl.arange(0, BLOCK_S)
    split_ok = splits < n_splits
    dv = tl.arange(0, BLOCK_DV)
    lse = tl.load(
        LSE_PART + batch * stride_lb + head * stride_lh + splits, mask=split_ok, other=float("-inf")
    )
    top = tl.max(lse, 0)
    weights = tl.exp(lse - tl.where(top == float("-inf"), 0.0, top))
    parts = tl.load(
        OUT_PART + batch * stride_pb + head * stride_ph + splits[:, None] * stride_ps + dv[None, :],
        mask=split_ok[:, None] & (dv[None, :] < DV),
        other=0.0,
    )
    total = tl.sum(weights, 0)
    out = tl.sum(parts * weights[:, None], 0) / tl.where(total > 0, total, 1.0)
    tl.store(OUT + batch * stride_ob + head * stride_oh + dv, out.to(OUT.dtype.element_ty), mask=dv < DV)


def value_is_key_prefix(k: torch.Tensor, v: torch.Tensor) -> bool:
    """MLA's cache layout: V is a view of K's leading columns (the latent of the ``[c | k_pe]`` row),
    so the kernel can reuse the key tile it already loaded instead of reading the row twice."""
    return (
        v.data_ptr() == k.data_ptr()
        and v.stride()[:2] == k.stride()[:2]
        and (v.shape[2] == 1 or v.stride(2) == k.stride(2))
        and v.shape[-1] <= _largest_power_of_two_at_most(k.shape[-1])
    )


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _default_splits(programs: int, k_len: int, block_n: int, device: torch.device) -> int:
    if device.type == "cuda":
        target = PROGRAMS_PER_SM * _sm_count(device.index or 0)
    else:  # interpreter: two splits, so the merge step is exercised
        target = 2 * programs
    return max(1, min(MAX_SPLITS, triton.cdiv(target, programs), triton.cdiv(k_len, block_n)))


def _largest_power_of_two_at_most(n: int) -> int:
    return 1 << (n.bit_length() - 1)


def decode_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    window: int | None = None,
    kv_lens: torch.Tensor | None = None,
    n_splits: int | None = None,
) -> torch.Tensor:
    """``q`` (batch, 1, n_heads, dk) over ``k`` (batch, slots, n_kv_heads, dk) and ``v`` (…, dv);
    keys at slots ≥ ``kv_lens[b]`` are empty and the window counts back from the last filled slot.
    Returns ``(batch, 1, n_heads, dv)`` in ``q``'s dtype."""
    batch, q_len, n_heads, dk = q.shape
    _, slots, n_kv_heads, dv = v.shape
    if q_len != 1:
        raise ValueError(f"decode_attention takes one query token per sequence, got q_len={q_len}")
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    if kv_lens is None:
        kv_lens = torch.full((1,), slots, dtype=torch.int32, device=q.device)
    group = n_heads // n_kv_heads
    block_h = max(16, min(64, triton.next_power_of_2(group)))  # tl.dot needs ≥ 16 rows
    head_blocks = triton.cdiv(group, block_h)
    block_d1 = max(16, _largest_power_of_two_at_most(dk))
    rest = dk - block_d1
    block_d2 = max(16, triton.next_power_of_2(rest)) if rest > 0 else 0
    block_dv = max(16, triton.next_power_of_2(dv))
    block_n = 32 if dk >= 256 else 64
    v_from_k = value_is_key_prefix(k, v) and block_dv == block_d1
    programs = batch * n_kv_heads * head_blocks
    n_splits = n_splits or _default_splits(programs, slots, block_n, q.device)
    out_part = torch.empty(batch, n_heads, n_splits, dv, dtype=torch.float32, device=q.device)
    lse_part = torch.empty(batch, n_heads, n_splits, dtype=torch.float32, device=q.device)
    out = torch.empty(batch, n_heads, dv, dtype=q.dtype, device=q.device)
    q3 = q[:, 0]
    _split_kernel[(batch, n_kv_heads * head_blocks, n_splits)](
        q3, k, v, kv_lens, out_part, lse_part,
        q3.stride(0), q3.stride(1),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        kv_lens.stride(0) if kv_lens.numel() > 1 else 0,
        out_part.stride(0), out_part.stride(1), out_part.stride(2),
        lse_part.stride(0), lse_part.stride(1),
        scale, window or 0, n_splits,
        GROUP=group, HEAD_BLOCKS=head_blocks, DK=dk, DV=dv,
        BLOCK_H=block_h, BLOCK_N=block_n, BLOCK_D1=block_d1, BLOCK_D2=block_d2, BLOCK_DV=block_dv,
        V_FROM_K=v_from_k, IEEE=q.dtype == torch.float32,
        num_warps=4, num_stages=2,
    )  # fmt: skip
    _merge_kernel[(batch, n_heads)](
        out_part, lse_part, out,
        out_part.stride(0), out_part.stride(1), out_part.stride(2),
        lse_part.stride(0), lse_part.stride(1),
        out.stride(0), out.stride(1),
        n_splits,
        DV=dv, BLOCK_S=max(2, triton.next_power_of_2(n_splits)), BLOCK_DV=block_dv,
    )  # fmt: skip
    return out.unsqueeze(1)
