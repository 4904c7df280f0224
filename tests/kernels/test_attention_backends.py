"""Every backend equals the eager reference on causal, windowed, GQA/MQA and masked inputs."""

from __future__ import annotations

import pytest
import torch

from kvforge.kernels import BackendUnavailable, attention, available_backends, causal_window_mask

CASES = [
    # (q_len, k_len, n_heads, n_kv_heads, head_dim, v_dim, window)
    (16, 16, 8, 8, 16, 16, None),  # MHA causal
    (16, 16, 8, 2, 16, 16, None),  # GQA
    (16, 16, 8, 1, 16, 16, None),  # MQA
    (16, 16, 8, 2, 16, 16, 5),  # sliding window
    (3, 19, 8, 2, 16, 16, None),  # a query block after cached keys
    (3, 19, 8, 2, 16, 16, 6),  # ... with a window
    (1, 19, 8, 2, 16, 16, None),  # single-token decode
    (1, 19, 8, 2, 16, 16, 4),
    (5, 12, 8, 1, 20, 12, None),  # MLA-absorbed shape: one KV head, V narrower than K
    (12, 12, 4, 4, 24, 16, None),  # MLA-expanded training shape: V narrower (padded to stay fused)
    (12, 12, 4, 2, 8, 16, 5),  # V wider than Q/K
]


def _inputs(q_len, k_len, n_heads, n_kv_heads, head_dim, v_dim, dtype=torch.float32, device="cpu"):
    q = torch.randn(2, q_len, n_heads, head_dim, dtype=dtype, device=device)
    k = torch.randn(2, k_len, n_kv_heads, head_dim, dtype=dtype, device=device)
    v = torch.randn(2, k_len, n_kv_heads, v_dim, dtype=dtype, device=device)
    return q, k, v


@pytest.mark.parametrize("case", CASES)
def test_sdpa_equals_eager(case):
    *shape, window = case
    q, k, v = _inputs(*shape)
    ref = attention(q, k, v, window=window, backend="eager")
    out = attention(q, k, v, window=window, backend="sdpa")
    assert out.shape == (2, shape[0], shape[2], shape[5])
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_explicit_mask_is_anded_with_causal():
    q, k, v = _inputs(6, 6, 4, 2, 8, 8)
    documents = torch.tensor([0, 0, 0, 1, 1, 1])
    same_doc = (documents[:, None] == documents[None, :]).view(1, 1, 6, 6)
    ref = attention(q, k, v, mask=same_doc, backend="eager")
    torch.testing.assert_close(attention(q, k, v, mask=same_doc, backend="sdpa"), ref, rtol=1e-5, atol=1e-5)
    # token 3 starts a new document: it sees only itself, so its output is its own value row
    torch.testing.assert_close(ref[:, 3], v[:, 3].repeat_interleave(2, dim=1), rtol=1e-5, atol=1e-5)


def test_eager_matches_naive_repeat_kv_softmax():
    q, k, v = _inputs(7, 7, 4, 2, 8, 8)
    k_rep, v_rep = k.repeat_interleave(2, dim=2), v.repeat_interleave(2, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k_rep) / 8**0.5
    scores = scores.masked_fill(~causal_window_mask(7, 7, causal=True, window=3), float("-inf"))
    expected = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v_rep)
    torch.testing.assert_close(attention(q, k, v, window=3, backend="eager"), expected, rtol=1e-5, atol=1e-5)


def test_window_mask_counts_the_query_itself():
    keep = causal_window_mask(4, 4, causal=True, window=2)
    assert keep.tolist() == [
        [True, False, False, False],
        [True, True, False, False],
        [False, True, True, False],
        [False, False, True, True],
    ]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"backend": "cudnn-magic"}, "backend='cudnn-magic' is not one of"),
        ({"window": 0}, "window=0"),
        ({"window": 3, "causal": False}, "needs causal=True"),
    ],
)
def test_bad_arguments_are_clear_errors(kwargs, match):
    q, k, v = _inputs(4, 4, 4, 2, 8, 8)
    with pytest.raises(ValueError, match=match):
        attention(q, k, v, **kwargs)


def test_heads_must_divide():
    q, k, v = _inputs(4, 4, 6, 4, 8, 8)
    with pytest.raises(ValueError, match="must be equal for k and v and divide n_heads=6"):
        attention(q, k, v)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
def test_flash_backend_refuses_cpu_with_a_clear_message():
    q, k, v = _inputs(4, 4, 4, 2, 8, 8)
    with pytest.raises(BackendUnavailable, match="flash"):
        attention(q, k, v, backend="flash")
    assert "flash" not in available_backends()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["sdpa", "flash"])
@pytest.mark.parametrize("case", CASES[:8])
def test_gpu_backends_equal_eager_in_bf16(backend, case):
    if backend not in available_backends():
        pytest.skip(f"{backend} is not installed here")
    *shape, window = case
    q, k, v = _inputs(*shape, dtype=torch.bfloat16, device="cuda")
    ref = attention(q.float(), k.float(), v.float(), window=window, backend="eager")
    out = attention(q, k, v, window=window, backend=backend)
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)
