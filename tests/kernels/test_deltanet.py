"""The gated delta rule: the chunked (WY) form equals the token-by-token recurrence (fp32, ≤ 1e-5),
including state carried between calls and query heads that share a state."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kvforge.kernels.deltanet import gated_delta_rule, gated_delta_rule_reference, gated_delta_rule_step
from kvforge.kernels.short_conv import causal_conv1d

TOL = 1e-5


def _inputs(batch=2, seq=37, q_heads=4, heads=2, dk=8, dv=6):
    q = F.normalize(torch.randn(batch, seq, q_heads, dk), dim=-1)
    k = F.normalize(torch.randn(batch, seq, heads, dk), dim=-1)
    v = torch.randn(batch, seq, heads, dv)
    g = -F.softplus(torch.randn(batch, seq, heads))  # log decay <= 0
    beta = torch.rand(batch, seq, heads)
    return q, k, v, g, beta


@pytest.mark.parametrize("chunk", [1, 8, 64])
def test_chunked_form_matches_recurrence(chunk):
    q, k, v, g, beta = _inputs()
    expected, expected_state = gated_delta_rule_reference(q, k, v, g, beta)
    out, state = gated_delta_rule(q, k, v, g, beta, chunk_size=chunk)
    assert (out - expected).abs().max().item() <= TOL
    assert (state - expected_state).abs().max().item() <= TOL


def test_a_block_continues_from_a_carried_state():
    q, k, v, g, beta = _inputs()
    whole, whole_state = gated_delta_rule(q, k, v, g, beta, chunk_size=8)
    first, state = gated_delta_rule(q[:, :20], k[:, :20], v[:, :20], g[:, :20], beta[:, :20], chunk_size=8)
    second, state = gated_delta_rule(
        q[:, 20:], k[:, 20:], v[:, 20:], g[:, 20:], beta[:, 20:], state=state, chunk_size=8
    )
    assert (torch.cat((first, second), 1) - whole).abs().max().item() <= TOL
    assert (state - whole_state).abs().max().item() <= TOL


def test_delta_rule_overwrites_a_key_it_wrote_before():
    # beta = 1, no decay, the same unit key twice: the state holds the second value only.
    k = F.normalize(torch.randn(1, 1, 1, 4), dim=-1).expand(1, 2, 1, 4)
    v = torch.randn(1, 2, 1, 3)
    ones, zeros = torch.ones(1, 2, 1), torch.zeros(1, 2, 1)
    out, _ = gated_delta_rule(k, k, v, zeros, ones, scale=1.0)
    assert torch.allclose(out[0, 1, 0], v[0, 1, 0], atol=TOL)


def test_step_refuses_blocks():
    q, k, v, g, beta = _inputs(seq=2)
    with pytest.raises(ValueError, match="one token"):
        gated_delta_rule_step(q, k, v, g, beta)


def test_short_convolution_continues_across_calls():
    x, weight = torch.randn(2, 11, 5), torch.randn(5, 1, 4)
    whole, _ = causal_conv1d(x, weight)
    first, state = causal_conv1d(x[:, :6], weight)
    parts = [first]
    for t in range(6, 11):
        out, state = causal_conv1d(x[:, t : t + 1], weight, state)
        parts.append(out)
    assert (torch.cat(parts, 1) - whole).abs().max().item() <= TOL
    # tap K-1 is the current input: a delta there is the identity (before the SiLU)
    identity = torch.zeros(5, 1, 4)
    identity[..., -1] = 1
    assert torch.equal(causal_conv1d(x, identity, activation=False)[0], x)
