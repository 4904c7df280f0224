"""Numerical faults: a NaN/Inf loss or gradient never reaches the weights unnoticed.

:class:`NonFiniteGuard` looks at the loss before backward and at the gradients before every optimizer
step (after DDP's all-reduce, so every rank decides alike). ``policy="stop"`` (default) ends the run
with :class:`NonFiniteError` before the bad update; ``policy="skip"`` drops the step's gradients (AdamW
then leaves every parameter and its moments untouched) and stops after ``max_consecutive_skips`` in a
row. Either way the message names the global step and the last good checkpoint to resume from.
"""

from __future__ import annotations

from typing import Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn

POLICIES = ("stop", "skip")


class NonFiniteError(RuntimeError):
    """Training produced a NaN/Inf loss or gradient and the policy says stop."""


def last_good_checkpoint(trainer: pl.Trainer) -> str | None:
    """The newest checkpoint this run wrote, else the one it resumed from."""
    saved = [
        getattr(callback, "last_model_path", "") or getattr(callback, "_last_checkpoint_saved", "")
        for callback in trainer.checkpoint_callbacks
    ]
    saved = [path for path in saved if path]
    return saved[-1] if saved else trainer.ckpt_path


def _total_norm(parameters) -> torch.Tensor | None:
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return None
    norm = torch.nn.utils.get_total_norm(grads)
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP2: DTensor


def _value(tensor: torch.Tensor | None) -> float | None:
    return None if tensor is None else tensor.item()


class NonFiniteGuard(pl.Callback):
    """Args:
    policy: ``stop`` raises before the bad update; ``skip`` drops the step's gradients.
    max_consecutive_skips: with ``skip``, this many bad steps in a row stop the run anyway (a diverged
        run does not recover by skipping).
    """

    def __init__(self, policy: Literal["stop", "skip"] = "stop", max_consecutive_skips: int = 5) -> None:
        if policy not in POLICIES:
            raise ValueError(f"nan_guard.policy={policy!r}: allowed values are {list(POLICIES)}")
        if max_consecutive_skips < 1:
            raise ValueError(f"nan_guard.max_consecutive_skips={max_consecutive_skips}: must be >= 1")
        self.policy, self.max_consecutive_skips = policy, max_consecutive_skips
        self.consecutive = 0
        self.skipped_steps: list[int] = []
        self._loss: torch.Tensor | None = None

    def on_before_backward(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor
    ) -> None:
        # Kept on the device: one host sync per optimizer step, not per micro-batch.
        loss = loss.detach().float()
        kept = self._loss
        self._loss = loss if kept is None else torch.where(torch.isfinite(kept), loss, kept)

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer) -> None:
        loss, self._loss = self._loss, None  # the first non-finite micro-batch loss, else the last
        # Under fp16 loss scaling, overflowing gradients are routine: GradScaler skips those steps and
        # lowers the scale itself, so there only the loss counts.
        scaled = getattr(trainer.precision_plugin, "scaler", None) is not None
        norm = None if scaled else _total_norm(pl_module.parameters())
        values = [v.float().reshape(1) for v in (loss, norm) if v is not None]
        local_fault = bool(values) and not bool(torch.isfinite(torch.cat(values)).all())
        # Ranks must agree (a NaN loss can be local to one rank's batch): any rank's fault counts.
        if not trainer.strategy.reduce_boolean_decision(local_fault, all=False):
            self.consecutive = 0
            return
        step = trainer.global_step  # optimizer steps done so far: this would be step `step + 1`
        what = f"loss={_value(loss)}, gradient norm={_value(norm)}"
        checkpoint = last_good_checkpoint(trainer)
        resume = (
            f"the last good checkpoint is {checkpoint} (resume with --ckpt_path last)"
            if checkpoint
            else "no checkpoint was written yet"
        )
        self.consecutive += 1
        if self.policy == "stop" or self.consecutive > self.max_consecutive_skips:
            why = (
                "nan_guard.policy=stop"
                if self.policy == "stop"
                else f"{self.consecutive} bad steps in a row > nan_guard.max_consecutive_skips="
                f"{self.max_consecutive_skips}"
            )
            raise NonFiniteError(
                f"non-finite training values at global step {step} ({what}); stopping before the update "
                f"({why}); {resume}. Lower the learning rate, check the data, or set nan_guard.policy=skip"
            )
        optimizer.zero_grad(set_to_none=True)  # AdamW skips parameters without gradients
        self.skipped_steps.append(step)
        rank_zero_warn(
            f"skipped the update of global step {step}: non-finite {what} "
            f"({self.consecutive} in a row, at most {self.max_consecutive_skips}); {resume}"
        )
        pl_module.log("train/skipped_steps", float(len(self.skipped_steps)))
