"""Every backend equals the eager reference on causal, windowed, GQA/MQA and masked inputs; packed
documents and static-cache fill lengths equal their independent references (each document alone,
the filled prefix alone)."""

from __future__ import annotations

import pytest
import torch

from kvforge.kernels.attention import BackendUnavailable, attention, available_backends
from kvforge.kernels.masks import causal_window_mask

# Backends that run on CPU (flex eagerly, as a dense reference); all must equal eager in fp32.
CPU_BACKENDS = ["sdpa", "sdpa-math", "sdpa-flash", "flex"]

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


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("case", CASES)
def test_cpu_backends_equal_eager(backend, case):
    *shape, window = case
    q, k, v = _inputs(*shape)
    ref = attention(q, k, v, window=window, backend="eager")
    out = attention(q, k, v, window=window, backend=backend)
    assert out.shape == (2, shape[0], shape[2], shape[5])
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def _packed(batch=2, seq=12, n_heads=4, n_kv_heads=2, dim=8):
    q, k, v = _inputs(seq, seq, n_heads, n_kv_heads, dim, dim)
    q, k, v = q[:batch], k[:batch], v[:batch]
    document_ids = torch.tensor([[0] * 5 + [1] * 4 + [2] * 3, [0] * 2 + [1] * 10])[:batch]
    return q, k, v, document_ids


def _per_document_reference(q, k, v, document_ids, window=None):
    """Each document run on its own through eager attention, results laid back in place."""
    out = torch.empty_like(q)
    for row in range(q.shape[0]):
        for doc in document_ids[row].unique():
            cols = (document_ids[row] == doc).nonzero().flatten()
            sl = slice(int(cols[0]), int(cols[-1]) + 1)
            out[row : row + 1, sl] = attention(
                q[row : row + 1, sl],
                k[row : row + 1, sl],
                v[row : row + 1, sl],
                window=window,
                backend="eager",
            )
    return out


@pytest.mark.parametrize("window", [None, 3])
@pytest.mark.parametrize("backend", ["eager", *CPU_BACKENDS])
def test_packed_documents_equal_each_document_alone(backend, window):
    q, k, v, document_ids = _packed()
    expected = _per_document_reference(q, k, v, document_ids, window)
    out = attention(q, k, v, window=window, document_ids=document_ids, backend=backend)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("window", [None, 4])
@pytest.mark.parametrize("q_len", [1, 3])
@pytest.mark.parametrize("backend", ["eager", *CPU_BACKENDS])
def test_fill_lengths_equal_attention_over_the_filled_prefix(backend, q_len, window):
    # A static buffer of 16 slots, rows filled to 11 and 6; the empty slots hold garbage.
    q, k, v = _inputs(q_len, 16, 8, 2, 16, 16)
    kv_lens = torch.tensor([11, 6])
    out = attention(q, k, v, window=window, kv_lens=kv_lens, backend=backend)
    for row, filled in enumerate(kv_lens.tolist()):
        expected = attention(
            q[row : row + 1],
            k[row : row + 1, :filled],
            v[row : row + 1, :filled],
            window=window,
            backend="eager",
        )
        torch.testing.assert_close(out[row : row + 1], expected, rtol=1e-5, atol=1e-5)


def test_a_forced_sdpa_kernel_that_cannot_run_is_a_clear_error():
    q, k, v = _inputs(1, 12, 8, 1, 20, 12)  # one query, K and V of different widths: no flash kernel
    with pytest.raises(BackendUnavailable, match="sdpa-flash"):
        attention(q, k, v, backend="sdpa-flash")
    with pytest.raises(BackendUnavailable, match="no cudnn SDPA kernel on cpu"):
        attention(q, k, v, backend="sdpa-cudnn")


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
        (
            {"document_ids": torch.zeros(2, 3, dtype=torch.long)},
            r"document_ids must be \(batch, seq\) = \(2, 4\)",
        ),
        ({"document_ids": torch.zeros(2, 4)}, "integer tensor"),
        ({"kv_lens": torch.tensor([[4]])}, r"kv_lens must be \(batch,\) or \(1,\)"),
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


GPU_BACKENDS = ["sdpa", "sdpa-cudnn", "sdpa-flash", "sdpa-efficient", "flex", "flash", "auto"]


def _gpu_or_skip(backend, q, k, v, **kwargs):
    try:
        return attention(q, k, v, backend=backend, **kwargs)
    except BackendUnavailable as err:
        pytest.skip(f"{backend} cannot run this case here: {err}")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("case", CASES)
def test_gpu_backends_equal_eager_in_bf16(backend, case):
    *shape, window = case
    q, k, v = _inputs(*shape, dtype=torch.bfloat16, device="cuda")
    ref = attention(q.float(), k.float(), v.float(), window=window, backend="eager")
    out = _gpu_or_skip(backend, q, k, v, window=window)
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_packed_documents_equal_each_document_alone_in_bf16(backend):
    q, k, v, document_ids = (t.cuda() for t in _packed())
    expected = _per_document_reference(q, k, v, document_ids)
    out = _gpu_or_skip(backend, q.bfloat16(), k.bfloat16(), v.bfloat16(), document_ids=document_ids)
    torch.testing.assert_close(out.float(), expected, rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", [*GPU_BACKENDS, "triton"])
@pytest.mark.parametrize("window", [None, 4])
def test_gpu_fill_lengths_equal_the_filled_prefix_in_bf16(backend, window):
    q, k, v = _inputs(1, 300, 8, 2, 64, 64, dtype=torch.bfloat16, device="cuda")
    kv_lens = torch.tensor([257, 6], device="cuda")
    out = _gpu_or_skip(backend, q, k, v, window=window, kv_lens=kv_lens)
    for row, filled in enumerate(kv_lens.tolist()):
        sl = slice(row, row + 1)
        expected = attention(q[sl].float(), k[sl, :filled].float(), v[sl, :filled].float(), window=window)
        torch.testing.assert_close(out[sl].float(), expected, rtol=2e-2, atol=2e-2)
