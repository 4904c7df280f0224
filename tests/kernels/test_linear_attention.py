"""Linear attention (Hedgehog features, optional softmax window): the chunked parallel form and the
recurrent step both equal the quadratic reference formula (fp32, ≤ 1e-5)."""

from __future__ import annotations

import pytest
import torch

from kvforge.kernels.linear_attention import (
    LinearState,
    hedgehog_features,
    linear_attention,
    linear_attention_reference,
    linear_attention_step,
)

TOL = 1e-5


def _inputs(batch=2, seq=23, heads=4, kv_heads=2, dim=8, features=6):
    q = torch.randn(batch, seq, heads, dim)
    k = torch.randn(batch, seq, kv_heads, dim)
    v = torch.randn(batch, seq, kv_heads, dim + 2)  # dv != dk
    fq = hedgehog_features(q, torch.randn(heads, dim, features))
    k_h = k.repeat_interleave(heads // kv_heads, dim=2)
    fk = hedgehog_features(k_h, torch.randn(heads, dim, features))
    return q, k, v, fq, fk


@pytest.mark.parametrize("window", [0, 1, 4, 30])
@pytest.mark.parametrize("chunk", [1, 5, 64])
def test_chunked_form_matches_quadratic_reference(window, chunk):
    q, k, v, fq, fk = _inputs()
    gamma = torch.rand(4) + 0.1
    reference = linear_attention_reference(q, k, v, fq, fk, window=window, window_weight=gamma)
    out, _ = linear_attention(q, k, v, fq, fk, window=window, window_weight=gamma, chunk_size=chunk)
    assert (out - reference).abs().max().item() <= TOL


@pytest.mark.parametrize("window", [0, 1, 4])
def test_recurrent_steps_match_parallel_form(window):
    q, k, v, fq, fk = _inputs()
    gamma = torch.rand(4) + 0.1
    parallel, _ = linear_attention(q, k, v, fq, fk, window=window, window_weight=gamma, chunk_size=8)
    state = LinearState.zeros(2, 4, fq.shape[-1], v.shape[-1])
    outs = []
    for t in range(q.shape[1]):
        lo = max(t - window + 1, 0) if window else t
        out, state = linear_attention_step(
            q[:, t : t + 1],
            k[:, lo : t + 1],
            v[:, lo : t + 1],
            fq[:, t : t + 1],
            fk[:, lo : lo + 1],
            window=window,
            window_weight=gamma,
            state=state,
        )
        outs.append(out)
    assert (torch.cat(outs, dim=1) - parallel).abs().max().item() <= TOL


@pytest.mark.parametrize("window", [0, 3])
def test_state_and_tail_continue_a_sequence_exactly(window):
    # Prefill 9 tokens, then feed 14 more with the returned state plus the last window-1 raw keys.
    q, k, v, fq, fk = _inputs()
    whole, _ = linear_attention(q, k, v, fq, fk, window=window, chunk_size=4)
    first, state = linear_attention(q[:, :9], k[:, :9], v[:, :9], fq[:, :9], fk[:, :9], window=window)
    tail = max(window - 1, 0)
    keys = slice(9 - tail, None)
    second, _ = linear_attention(
        q[:, 9:], k[:, keys], v[:, keys], fq[:, 9:], fk[:, keys], window=window, state=state
    )
    assert (torch.cat((first, second), dim=1) - whole).abs().max().item() <= TOL


def test_features_are_positive_and_sum_to_two():
    features = hedgehog_features(torch.randn(1, 3, 2, 4), torch.randn(2, 4, 5))
    assert features.shape == (1, 3, 2, 10) and (features > 0).all()
    assert torch.allclose(features.sum(-1), torch.full((1, 3, 2), 2.0))


def test_bad_window_is_a_clear_error():
    q, k, v, fq, fk = _inputs()
    with pytest.raises(ValueError, match="window=-1"):
        linear_attention(q, k, v, fq, fk, window=-1)
