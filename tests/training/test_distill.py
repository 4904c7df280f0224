"""Distillation loss: each KL direction against a hand-computed value; α = 1 is plain cross-entropy."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kvforge.kernels.cross_entropy import IGNORE_INDEX
from kvforge.training.distill import DistillationConfig, distillation_loss

TEACHER_P = [0.5, 0.25, 0.25]


def _one_token(temperature=1.0):
    student = torch.zeros(1, 1, 3)  # uniform
    teacher = torch.tensor(TEACHER_P).log().view(1, 1, 3)
    return student, teacher, torch.tensor([[0]])


def _softened(p, temperature):
    weights = [x ** (1 / temperature) for x in p]
    return [w / sum(weights) for w in weights]


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_forward_kl_is_kl_teacher_to_student(temperature):
    student, teacher, targets = _one_token()
    p_t, p_s = _softened(TEACHER_P, temperature), [1 / 3] * 3
    expected = sum(t * math.log(t / s) for t, s in zip(p_t, p_s))
    out = distillation_loss(student, teacher, targets, DistillationConfig(temperature=temperature))
    assert out["kl"].item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_reverse_kl_is_kl_student_to_teacher(temperature):
    student, teacher, targets = _one_token()
    p_t, p_s = _softened(TEACHER_P, temperature), [1 / 3] * 3
    expected = sum(s * math.log(s / t) for t, s in zip(p_t, p_s))
    config = DistillationConfig(temperature=temperature, kl="reverse")
    assert distillation_loss(student, teacher, targets, config)["kl"].item() == pytest.approx(
        expected, rel=1e-5
    )


def test_loss_weights_ce_and_temperature_squared_kl():
    student, teacher, targets = _one_token()
    config = DistillationConfig(alpha=0.3, temperature=2.0)
    out = distillation_loss(student, teacher, targets, config)
    assert out["ce"].item() == pytest.approx(math.log(3), rel=1e-6)
    expected = 0.3 * math.log(3) + 0.7 * 4.0 * out["kl"].item()
    assert out["loss"].item() == pytest.approx(expected, rel=1e-6)


def test_alpha_one_equals_plain_cross_entropy():
    student = torch.randn(2, 5, 11)
    teacher = torch.randn(2, 5, 11)
    targets = torch.randint(0, 11, (2, 5))
    out = distillation_loss(student, teacher, targets, DistillationConfig(alpha=1.0, temperature=3.0))
    torch.testing.assert_close(out["loss"], F.cross_entropy(student.reshape(-1, 11), targets.reshape(-1)))


def test_chunking_and_ignored_targets_do_not_change_the_loss():
    student = torch.randn(3, 7, 13, requires_grad=True)
    teacher = torch.randn(3, 7, 13)
    targets = torch.randint(0, 13, (3, 7))
    targets[0, :3] = IGNORE_INDEX
    whole = distillation_loss(student, teacher, targets, DistillationConfig(chunk_size=10_000))
    chunked = distillation_loss(student, teacher, targets, DistillationConfig(chunk_size=4))
    torch.testing.assert_close(chunked["loss"], whole["loss"], rtol=1e-6, atol=1e-6)
    kept = targets != IGNORE_INDEX
    reference = distillation_loss(
        student[kept].unsqueeze(0),
        teacher[kept].unsqueeze(0),
        targets[kept].unsqueeze(0),
        DistillationConfig(),
    )
    torch.testing.assert_close(whole["loss"], reference["loss"], rtol=1e-6, atol=1e-6)
    (grad_whole,) = torch.autograd.grad(whole["loss"], student)
    (grad_chunked,) = torch.autograd.grad(chunked["loss"], student)
    torch.testing.assert_close(grad_chunked, grad_whole, rtol=1e-5, atol=1e-7)


def test_identical_distributions_have_zero_kl():
    logits = torch.randn(2, 4, 9)
    assert (
        distillation_loss(logits, logits.clone(), torch.zeros(2, 4, dtype=torch.long), DistillationConfig())[
            "kl"
        ].abs()
        < 1e-6
    )


@pytest.mark.parametrize("field, value", [("alpha", 1.5), ("temperature", 0.0), ("kl", "sideways")])
def test_bad_distillation_options_name_the_field(field, value):
    with pytest.raises(ValueError, match=f"distill.{field}"):
        DistillationConfig(**{field: value})
