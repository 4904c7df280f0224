"""Fused, chunked distillation loss: loss, CE, KL and the gradients of the student's hidden states and head
weight equal the unchunked reference on full logits (1e-5), for both KL directions, temperatures, α and
ignored targets; the teacher gets no gradient."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kvforge.kernels.cross_entropy import IGNORE_INDEX
from kvforge.kernels.distillation import linear_distillation_loss

TOLERANCE = dict(rtol=1e-5, atol=1e-5)


def _reference(hidden, weight, teacher_hidden, teacher_weight, targets, alpha, temperature, reverse):
    """Full (tokens, vocab) logits of both models, the textbook formulas."""
    student = hidden.reshape(-1, hidden.shape[-1]) @ weight.t()
    teacher = teacher_hidden.reshape(-1, teacher_hidden.shape[-1]) @ teacher_weight.t()
    flat = targets.reshape(-1)
    valid = flat != IGNORE_INDEX
    ce = F.cross_entropy(student, flat, ignore_index=IGNORE_INDEX)
    log_q = F.log_softmax(student / temperature, dim=-1)
    log_p = F.log_softmax(teacher / temperature, dim=-1)
    rows = (log_q.exp() * (log_q - log_p)) if reverse else (log_p.exp() * (log_p - log_q))
    kl = rows.sum(-1)[valid].mean()
    return alpha * ce + (1 - alpha) * temperature**2 * kl, ce, kl


def _inputs(seed=0, batch=3, seq=11, d=16, d_teacher=24, vocab=37):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, seq, d, generator=generator, requires_grad=True)
    weight = torch.randn(vocab, d, generator=generator).mul_(0.3).requires_grad_()
    teacher_hidden = torch.randn(batch, seq, d_teacher, generator=generator)
    teacher_weight = torch.randn(vocab, d_teacher, generator=generator).mul_(0.3)
    targets = torch.randint(0, vocab, (batch, seq), generator=generator)
    targets[0, :4] = IGNORE_INDEX
    targets[2, -1] = IGNORE_INDEX
    return hidden, weight, teacher_hidden, teacher_weight, targets


@pytest.mark.parametrize("reverse", [False, True], ids=["forward-kl", "reverse-kl"])
@pytest.mark.parametrize("temperature, alpha", [(1.0, 0.5), (2.0, 0.3), (0.7, 0.0)])
@pytest.mark.parametrize("chunk_size", [4, 7, 1024])
def test_chunked_loss_and_gradients_equal_the_unchunked_reference(reverse, temperature, alpha, chunk_size):
    hidden, weight, teacher_hidden, teacher_weight, targets = _inputs()
    options = dict(alpha=alpha, temperature=temperature, reverse=reverse)
    loss, ce, kl = linear_distillation_loss(
        hidden, weight, teacher_hidden, teacher_weight, targets, chunk_size=chunk_size, **options
    )
    grads = torch.autograd.grad(loss, (hidden, weight))
    ref_loss, ref_ce, ref_kl = _reference(hidden, weight, teacher_hidden, teacher_weight, targets, **options)
    ref_grads = torch.autograd.grad(ref_loss, (hidden, weight))
    torch.testing.assert_close(loss, ref_loss, **TOLERANCE)
    torch.testing.assert_close(ce, ref_ce, **TOLERANCE)
    torch.testing.assert_close(kl, ref_kl, **TOLERANCE)
    for got, expected in zip(grads, ref_grads):
        torch.testing.assert_close(got, expected, **TOLERANCE)


def test_upstream_gradient_scales_the_result():
    hidden, weight, teacher_hidden, teacher_weight, targets = _inputs(seed=1)
    loss, _, _ = linear_distillation_loss(
        hidden, weight, teacher_hidden, teacher_weight, targets, chunk_size=5
    )
    (grad,) = torch.autograd.grad(3.0 * loss, hidden)
    ref_loss, _, _ = _reference(hidden, weight, teacher_hidden, teacher_weight, targets, 0.5, 1.0, False)
    (ref_grad,) = torch.autograd.grad(3.0 * ref_loss, hidden)
    torch.testing.assert_close(grad, ref_grad, **TOLERANCE)


def test_teacher_gets_no_gradient_and_logged_terms_are_detached():
    hidden, weight, teacher_hidden, teacher_weight, targets = _inputs(seed=2)
    teacher_weight.requires_grad_()
    loss, ce, kl = linear_distillation_loss(hidden, weight, teacher_hidden, teacher_weight, targets)
    loss.backward()
    assert teacher_weight.grad is None
    assert not ce.requires_grad and not kl.requires_grad


def test_identical_models_have_zero_kl():
    hidden, weight, _, _, targets = _inputs(seed=3, d_teacher=16)
    _, _, kl = linear_distillation_loss(hidden, weight, hidden.detach(), weight.detach(), targets)
    assert kl.abs().item() < 1e-6


def test_bf16_inputs_accumulate_in_float32_close_to_the_float32_result():
    hidden, weight, teacher_hidden, teacher_weight, targets = _inputs(seed=4)
    full, _, _ = linear_distillation_loss(
        hidden, weight, teacher_hidden, teacher_weight, targets, chunk_size=8
    )
    low, _, _ = linear_distillation_loss(
        *(t.detach().bfloat16() for t in (hidden, weight, teacher_hidden, teacher_weight)),
        targets,
        chunk_size=8,
    )
    assert low.dtype == torch.float32
    torch.testing.assert_close(low, full.detach(), rtol=2e-2, atol=2e-2)


def test_mismatched_vocabularies_are_refused_with_both_sizes():
    hidden, weight, teacher_hidden, teacher_weight, targets = _inputs(seed=5)
    with pytest.raises(ValueError, match="student vocabulary 37 and teacher vocabulary 36"):
        linear_distillation_loss(hidden, weight, teacher_hidden, teacher_weight[:-1], targets)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_bf16_loss_and_gradients_close_to_the_float32_reference():
    hidden, weight, teacher_hidden, teacher_weight, targets = (t.cuda() for t in _inputs(seed=6, vocab=4096))
    hidden, weight = (t.detach().bfloat16().requires_grad_() for t in (hidden, weight))
    loss, _, _ = linear_distillation_loss(
        hidden, weight, teacher_hidden.bfloat16(), teacher_weight.bfloat16(), targets, chunk_size=8
    )
    grads = torch.autograd.grad(loss, (hidden, weight))
    reference = _reference(
        hidden.float(),
        weight.float(),
        teacher_hidden.bfloat16().float(),
        teacher_weight.bfloat16().float(),
        targets,
        0.5,
        1.0,
        False,
    )[0]
    ref_grads = torch.autograd.grad(reference, (hidden, weight))
    torch.testing.assert_close(loss, reference, rtol=2e-2, atol=2e-2)
    for got, expected in zip(grads, ref_grads):
        torch.testing.assert_close(got.float(), expected.float(), rtol=2e-2, atol=2e-2)
