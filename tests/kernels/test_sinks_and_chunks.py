"""Attention sinks and chunked local attention in the kernels: eager equals transformers' gpt-oss sink
math, every CPU backend equals eager (values and the sinks' gradient), chunks equal each chunk alone."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from kvforge.kernels.attention import BackendUnavailable, attention
from kvforge.kernels.masks import causal_window_mask

CPU_BACKENDS = ["sdpa", "sdpa-math", "sdpa-flash", "flex"]
TOL = dict(rtol=1e-5, atol=1e-5)

CASES = [
    # (q_len, k_len, n_heads, n_kv_heads, head_dim, v_dim, window)
    (16, 16, 8, 2, 16, 16, None),
    (16, 16, 8, 8, 16, 16, 5),
    (3, 19, 8, 2, 16, 16, 6),  # a query block after cached keys
    (1, 19, 8, 1, 16, 16, None),  # decode
    (5, 12, 8, 1, 20, 12, None),  # MLA-absorbed shape: V narrower than K
]


def _inputs(q_len, k_len, n_heads, n_kv_heads, head_dim, v_dim):
    q = torch.randn(2, q_len, n_heads, head_dim)
    k = torch.randn(2, k_len, n_kv_heads, head_dim)
    v = torch.randn(2, k_len, n_kv_heads, v_dim)
    return q, k, v


def _sinks(n_heads):
    return torch.randn(n_heads) * 2  # some heads sink a lot, some hardly


@pytest.mark.parametrize("window", [None, 4])
def test_eager_sinks_equal_transformers_gpt_oss_attention(window):
    from transformers.models.gpt_oss.modeling_gpt_oss import eager_attention_forward

    q, k, v = _inputs(9, 9, 8, 2, 16, 16)
    sinks = _sinks(8)
    keep = causal_window_mask(9, 9, causal=True, window=window)
    additive = torch.zeros(9, 9).masked_fill(~keep, float("-inf")).view(1, 1, 9, 9)
    module = SimpleNamespace(sinks=sinks, num_key_value_groups=4, training=False)
    expected, _ = eager_attention_forward(
        module, q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), additive, scaling=0.25
    )
    out = attention(q, k, v, window=window, scale=0.25, sinks=sinks, backend="eager")
    torch.testing.assert_close(out, expected, **TOL)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("case", CASES)
def test_cpu_backends_with_sinks_equal_eager(backend, case):
    *shape, window = case
    q, k, v = _inputs(*shape)
    sinks = _sinks(shape[2])
    ref = attention(q, k, v, window=window, sinks=sinks, backend="eager")
    out = attention(q, k, v, window=window, sinks=sinks, backend=backend)
    torch.testing.assert_close(out, ref, **TOL)
    assert (ref - attention(q, k, v, window=window, backend="eager")).abs().max() > 1e-2  # sinks matter


@pytest.mark.parametrize("backend", ["sdpa", "flex"])
def test_sinks_with_fill_lengths_and_documents_equal_eager(backend):
    q, k, v = _inputs(1, 16, 8, 2, 16, 16)
    sinks, kv_lens = _sinks(8), torch.tensor([11, 6])
    ref = attention(q, k, v, kv_lens=kv_lens, sinks=sinks, backend="eager")
    torch.testing.assert_close(attention(q, k, v, kv_lens=kv_lens, sinks=sinks, backend=backend), ref, **TOL)
    q, k, v = _inputs(12, 12, 4, 2, 8, 8)
    sinks = _sinks(4)
    document_ids = torch.tensor([[0] * 5 + [1] * 7, [0] * 2 + [1] * 10])
    ref = attention(q, k, v, sinks=sinks, document_ids=document_ids, backend="eager")
    out = attention(q, k, v, sinks=sinks, document_ids=document_ids, backend=backend)
    torch.testing.assert_close(out, ref, **TOL)


def test_sdpa_fold_in_gradients_equal_eager():
    q, k, v = _inputs(7, 7, 4, 2, 8, 8)
    sinks = _sinks(4)
    grads = {}
    for backend in ("eager", "sdpa"):
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v, sinks)]
        attention(*leaves[:3], window=3, sinks=leaves[3], backend=backend).square().sum().backward()
        grads[backend] = [t.grad for t in leaves]
    for got, expected in zip(grads["sdpa"], grads["eager"]):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_very_negative_sinks_change_nothing():
    q, k, v = _inputs(6, 6, 4, 2, 8, 8)
    plain = attention(q, k, v, backend="eager")
    for backend in ("eager", "sdpa", "flex"):
        out = attention(q, k, v, sinks=torch.full((4,), -1e4), backend=backend)
        torch.testing.assert_close(out, plain, **TOL)


def test_backends_without_sinks_refuse_clearly():
    q, k, v = _inputs(1, 8, 4, 2, 8, 8)
    with pytest.raises(BackendUnavailable, match="cannot apply attention sinks"):
        attention(q, k, v, sinks=torch.zeros(4), backend="flash")
    with pytest.raises(ValueError, match=r"one logit per query head, shape \(4,\)"):
        attention(q, k, v, sinks=torch.zeros(2), backend="eager")


@pytest.mark.parametrize("backend", ["eager", *CPU_BACKENDS])
@pytest.mark.parametrize("q_len", [12, 5, 1])
def test_chunks_equal_each_chunk_alone(backend, q_len):
    # 12 keys in chunks of 4 (key 0 starts a chunk); queries are the last q_len positions.
    q, k, v = _inputs(q_len, 12, 4, 2, 8, 8)
    out = attention(q, k, v, chunk=4, backend=backend)
    for i in range(q_len):
        pos = 12 - q_len + i
        first = pos // 4 * 4
        expected = attention(q[:, i : i + 1], k[:, first : pos + 1], v[:, first : pos + 1], backend="eager")
        torch.testing.assert_close(out[:, i : i + 1], expected, **TOL)


def test_chunk_and_fill_lengths_do_not_combine():
    q, k, v = _inputs(1, 8, 4, 2, 8, 8)
    with pytest.raises(ValueError, match="chunk and kv_lens do not combine"):
        attention(q, k, v, chunk=4, kv_lens=torch.tensor([3]))
