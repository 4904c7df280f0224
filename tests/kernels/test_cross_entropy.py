"""The fused chunked head + cross-entropy equals lm_head + F.cross_entropy, values and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kvforge.arch import CausalLM
from kvforge.kernels.cross_entropy import linear_cross_entropy, token_nll
from tests.conftest import tiny_form


def test_gradcheck_in_float64_with_ignored_rows():
    hidden = torch.randn(37, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 50, (37,))
    targets[[3, 20]] = -100
    assert torch.autograd.gradcheck(
        lambda h, w: linear_cross_entropy(h, w, targets, chunk_size=8), (hidden, weight)
    )


@pytest.mark.parametrize("chunk_size", [1, 7, 64, 4096])
def test_equals_unfused_loss_and_gradients(chunk_size):
    hidden = torch.randn(4, 30, 24, requires_grad=True)
    weight = torch.randn(101, 24, requires_grad=True)
    targets = torch.randint(0, 101, (4, 30))
    targets[0, :5] = -100
    ref = F.cross_entropy((hidden @ weight.T).reshape(-1, 101), targets.reshape(-1))
    ref_grads = torch.autograd.grad(ref, (hidden, weight))
    out = linear_cross_entropy(hidden, weight, targets, chunk_size=chunk_size)
    grads = torch.autograd.grad(out * 1.0, (hidden, weight))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    for got, expected in zip(grads, ref_grads):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)


def test_model_loss_equals_cross_entropy_of_logits_with_tied_head():
    model = CausalLM(tiny_form("mix", tie_embeddings=True))
    ids = torch.randint(0, 97, (2, 17))
    ref = F.cross_entropy(model(ids[:, :-1]).reshape(-1, 97), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(model.loss(ids[:, :-1], ids[:, 1:], chunk_size=5), ref, rtol=1e-5, atol=1e-6)


def test_no_gradient_work_under_no_grad():
    hidden, weight = torch.randn(8, 4), torch.randn(10, 4)
    with torch.no_grad():
        loss = linear_cross_entropy(hidden, weight, torch.randint(0, 10, (8,)))
    assert loss.grad_fn is None


def test_mismatched_shapes_are_rejected():
    with pytest.raises(ValueError, match="must agree"):
        linear_cross_entropy(torch.randn(3, 4), torch.randn(10, 4), torch.zeros(4, dtype=torch.long))


@pytest.mark.parametrize("block_bytes", [4, 4 * 50, 4 * 101 * 3, 2**30])  # one logit .. whole matrix
@pytest.mark.parametrize("softcap", [None, 3.0])
def test_token_nll_equals_cross_entropy_of_full_logits_for_any_block(block_bytes, softcap):
    """Blocks of rows, and of the vocabulary when one row is over budget (4 bytes: one logit at a time)."""
    torch.manual_seed(0)
    hidden, weight = torch.randn(3, 7, 24), torch.randn(101, 24)
    targets = torch.randint(0, 101, (3, 7))
    logits = hidden @ weight.T
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    reference = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
    got = token_nll(hidden, weight, targets, softcap=softcap, block_bytes=block_bytes)
    assert got.shape == (3, 7) and got.dtype == torch.float32
    torch.testing.assert_close(got, reference, rtol=1e-5, atol=1e-5)


def test_token_nll_keeps_float64_and_refuses_out_of_range_targets():
    hidden, weight = torch.randn(5, 8, dtype=torch.float64), torch.randn(11, 8, dtype=torch.float64)
    targets = torch.randint(0, 11, (5,))
    reference = F.cross_entropy(hidden @ weight.T, targets, reduction="none")
    torch.testing.assert_close(token_nll(hidden, weight, targets, block_bytes=64), reference)
    with pytest.raises(ValueError, match=r"token ids in 0\.\.10"):
        token_nll(hidden, weight, torch.full((5,), 11))
