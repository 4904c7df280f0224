"""AdamW with decoupled weight-decay groups and a per-step learning-rate schedule.

Weight decay (Loshchilov & Hutter, 2019) applies to the matrices of the linear layers only: norms and
biases are scale/shift parameters that decay would pull towards zero for no regularising benefit, and
the embedding (also the LM head when tied) holds rare tokens' rows that get few gradient updates, so
decay would erase them (the choice of OLMo and litgpt).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

SCHEDULES = ("cosine", "wsd", "constant")


@dataclass
class OptimizerConfig:
    """AdamW and its schedule.

    Args:
        lr: peak learning rate.
        weight_decay: decoupled decay of the linear-layer matrices (see the module docstring).
        betas, eps: AdamW moments.
        schedule: ``cosine`` (linear warmup, cosine to ``min_lr_ratio · lr``), ``wsd`` (warmup, stable,
            then a linear decay over the last ``decay_fraction`` of the steps; Hu et al. 2024, MiniCPM) or
            ``constant`` (after warmup).
        warmup_steps: optimizer steps of linear warmup from ``lr / warmup_steps``.
        min_lr_ratio: final learning rate as a fraction of ``lr``.
        decay_fraction: ``wsd`` only, the share of the steps spent decaying.
        total_steps: optimizer steps the schedule spans; ``None`` takes ``trainer.max_steps``.
        fused: fused AdamW kernel; ``None`` = on CUDA only.
    """

    lr: float = 3e-4
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    decay_fraction: float = 0.2
    total_steps: int | None = None
    fused: bool | None = None

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(f"optim.schedule={self.schedule!r}: allowed values are {list(SCHEDULES)}")
        if self.lr <= 0:
            raise ValueError(f"optim.lr={self.lr}: must be positive")
        if self.warmup_steps < 0:
            raise ValueError(f"optim.warmup_steps={self.warmup_steps}: must be >= 0")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"optim.min_lr_ratio={self.min_lr_ratio}: must be in [0, 1]")
        if not 0 < self.decay_fraction <= 1:
            raise ValueError(f"optim.decay_fraction={self.decay_fraction}: must be in (0, 1]")


@dataclass
class LRSchedule:
    """``LambdaLR`` multiplier as a callable object: its state is plain numbers, so it checkpoints
    (and reloads with ``weights_only=True``)."""

    schedule: str
    warmup_steps: int
    total_steps: int
    min_lr_ratio: float
    decay_fraction: float

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.schedule == "constant":
            return 1.0
        floor = self.min_lr_ratio
        if self.schedule == "cosine":
            span = max(1, self.total_steps - self.warmup_steps)
            progress = min(1.0, (step - self.warmup_steps) / span)
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
        decay_steps = max(1, round(self.decay_fraction * self.total_steps))
        decay_start = self.total_steps - decay_steps
        if step < decay_start:
            return 1.0
        progress = min(1.0, (step - decay_start) / decay_steps)
        return 1.0 - (1 - floor) * progress


def decay_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: linear-layer matrices with ``weight_decay``; norms, biases and embeddings without."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay, seen = [], [], set()
    for param in model.parameters():
        if not param.requires_grad or id(param) in seen:
            continue
        seen.add(id(param))
        (decay if param.ndim >= 2 and id(param) not in embeddings else no_decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(
    model: nn.Module, config: OptimizerConfig, total_steps: int | None
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    steps = config.total_steps or total_steps
    if config.schedule != "constant" and (steps is None or steps <= 0):
        raise ValueError(
            f"optim.schedule={config.schedule!r} needs the number of optimizer steps: set trainer.max_steps "
            "or optim.total_steps"
        )
    if steps is not None and config.warmup_steps > steps:
        raise ValueError(f"optim.warmup_steps={config.warmup_steps} exceeds the {steps} optimizer steps")
    fused = config.fused
    if fused is None:
        fused = all(p.is_cuda for p in model.parameters())
    optimizer = torch.optim.AdamW(
        decay_groups(model, config.weight_decay),
        lr=config.lr,
        betas=tuple(config.betas),
        eps=config.eps,
        fused=fused or None,
    )
    schedule = LRSchedule(
        config.schedule, config.warmup_steps, steps or 0, config.min_lr_ratio, config.decay_fraction
    )
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
