"""Knowledge distillation from a frozen teacher (Hinton, Vinyals & Dean, 2015).

    loss = α · CE(student, next tokens) + (1 − α) · T² · KL_T

``KL_T`` compares the two next-token distributions softened by temperature ``T`` (the T² factor keeps
the KL's gradient on the scale of the CE's as T grows), summed over the vocabulary and averaged over the
scored tokens. Its direction is explicit:

- ``kl="forward"`` (default): KL(teacher ‖ student) = Σ p_t · (log p_t − log p_s), Hinton's soft-target
  loss (its gradient is that of cross-entropy against the teacher's distribution); mass-covering.
- ``kl="reverse"``: KL(student ‖ teacher) = Σ p_s · (log p_s − log p_t); mode-seeking (MiniLLM, Gu et al.
  2024). Issue 5 writes the loss with this direction.

Both terms come from full logits, processed in chunks of tokens under activation checkpointing, so
the float32 softmax temporaries exist for one chunk at a time (forward and backward).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from kvforge.kernels.cross_entropy import IGNORE_INDEX

KL_DIRECTIONS = ("forward", "reverse")


@dataclass
class DistillationConfig:
    """Args:
    alpha: weight of the cross-entropy on the data; ``1`` switches the teacher off.
    temperature: softmax temperature ``T`` of both distributions in the KL term.
    kl: ``forward`` = KL(teacher ‖ student) (Hinton), ``reverse`` = KL(student ‖ teacher).
    teacher: model directory of the teacher; ``None`` = the unconverted ``init_from`` checkpoint.
    chunk_size: tokens per chunk of the loss computation.
    """

    alpha: float = 0.5
    temperature: float = 1.0
    kl: Literal["forward", "reverse"] = "forward"
    teacher: str | None = None
    chunk_size: int = 1024

    def __post_init__(self) -> None:
        if not 0 <= self.alpha <= 1:
            raise ValueError(f"distill.alpha={self.alpha}: must be in [0, 1] (1 = plain cross-entropy)")
        if self.temperature <= 0:
            raise ValueError(f"distill.temperature={self.temperature}: must be positive")
        if self.kl not in KL_DIRECTIONS:
            raise ValueError(f"distill.kl={self.kl!r}: allowed values are {list(KL_DIRECTIONS)}")
        if self.chunk_size <= 0:
            raise ValueError(f"distill.chunk_size={self.chunk_size}: must be positive")


def _chunk_sums(
    student: torch.Tensor,
    teacher: torch.Tensor,
    targets: torch.Tensor,
    temperature: float,
    reverse: bool,
) -> torch.Tensor:
    """[Σ CE, Σ KL] over the scored rows of one chunk, in float32."""
    valid = targets != IGNORE_INDEX
    student = student.float()
    ce = F.cross_entropy(student, targets.clamp(min=0), reduction="none")
    log_p_student = F.log_softmax(student / temperature, dim=-1)
    log_p_teacher = F.log_softmax(teacher.float() / temperature, dim=-1)
    if reverse:
        kl = (log_p_student.exp() * (log_p_student - log_p_teacher)).sum(-1)
    else:
        kl = (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(-1)
    return torch.stack(((ce * valid).sum(), (kl * valid).sum()))


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    targets: torch.Tensor,
    config: DistillationConfig,
) -> dict[str, torch.Tensor]:
    """``{"loss", "ce", "kl"}`` for logits ``(..., vocab)`` and ``targets`` (``IGNORE_INDEX`` rows skipped);
    ``kl`` is the unscaled KL at temperature T, ``loss`` the weighted sum with T²."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} differ: student and teacher must share the vocabulary"
        )
    vocab = student_logits.shape[-1]
    student = student_logits.reshape(-1, vocab)
    teacher = teacher_logits.detach().reshape(-1, vocab)
    flat_targets = targets.reshape(-1)
    sums = torch.zeros(2, device=student.device)
    for start in range(0, student.shape[0], config.chunk_size):
        rows = slice(start, start + config.chunk_size)
        args = (student[rows], teacher[rows], flat_targets[rows], config.temperature, config.kl == "reverse")
        sums = sums + (
            checkpoint(_chunk_sums, *args, use_reentrant=False)
            if student.requires_grad
            else _chunk_sums(*args)
        )
    n_scored = (flat_targets != IGNORE_INDEX).sum().clamp(min=1)
    ce, kl = sums / n_scored
    loss = config.alpha * ce + (1 - config.alpha) * config.temperature**2 * kl
    return {"loss": loss, "ce": ce, "kl": kl}
