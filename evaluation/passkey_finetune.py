"""A short fine-tune that teaches a small model the passkey format.

A 260K-parameter TinyStories model was never trained to retrieve anything, so its zero-shot passkey
accuracy is 0 at every length and says nothing about its attention form. Generated passkey prompts
(loss on the answer tokens only) teach it to copy the key, an induction-head pattern. The default is
one stage of 600 steps of 16 prompts of 76-128 tokens: afterwards stories260K retrieves a 5-digit key
when the needle is near the question and sometimes when it is further back. Longer prompts are much
harder for it (8-dimensional heads must single out one position among hundreds); the measured figures
are in docs/results.md, "Passkey fine-tuning of stories260K". ``stages`` lets larger models stretch
further. After the fine-tune, what limits retrieval is the attention form: a sliding
window shorter than the needle's distance cannot see the needle. Training prompts use their own
seed, so no evaluation prompt is trained on.
"""

from __future__ import annotations

import contextlib
import logging
import random
from collections.abc import Iterator
from dataclasses import dataclass

import lightning as L
import torch
from torch.utils.data import DataLoader, IterableDataset

from kvforge.arch import CausalLM
from kvforge.kernels.cross_entropy import IGNORE_INDEX

from .passkey import PasskeyTask


@dataclass
class FinetuneStage:
    steps: int
    max_context: int  # prompts of min_context..max_context tokens, in steps of context_step
    lr: float


@dataclass
class PasskeyFinetuneConfig:
    stages: tuple[FinetuneStage, ...] = (FinetuneStage(600, 128, 3e-3),)
    batch_size: int = 16
    min_context: int = 76  # a 5-digit stories260K prompt needs 75 tokens before any filler
    context_step: int = 4
    warmup_steps: int = 30
    seed: int = 1234  # differs from the evaluation seeds
    progress_bar: bool = False

    @property
    def steps(self) -> int:
        return sum(stage.steps for stage in self.stages)

    def stage_at(self, step: int) -> FinetuneStage:
        for stage in self.stages:
            if step < stage.steps:
                return stage
            step -= stage.steps
        return self.stages[-1]


class PasskeyStream(IterableDataset):
    """Batches of passkey prompts following the stages; each batch shares one length (no padding)."""

    def __init__(self, task: PasskeyTask, config: PasskeyFinetuneConfig) -> None:
        self.task = task
        self.config = config

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        rng = random.Random(self.config.seed)
        step = 0
        while True:
            stage = self.config.stage_at(step)
            context = rng.randrange(self.config.min_context, stage.max_context + 1, self.config.context_step)
            rows = [self.task.sample(context, rng.random(), rng) for _ in range(self.config.batch_size)]
            sequences = torch.tensor([row.prompt_ids + row.answer_ids for row in rows])
            targets = torch.full_like(sequences, IGNORE_INDEX)
            for index, row in enumerate(rows):
                start = len(row.prompt_ids)
                targets[index, start - 1 : start - 1 + len(row.answer_ids)] = torch.tensor(row.answer_ids)
            yield sequences[:, :-1], targets[:, :-1]
            step += 1


class PasskeyFinetune(L.LightningModule):
    def __init__(self, model: CausalLM, config: PasskeyFinetuneConfig) -> None:
        super().__init__()
        self.model = model
        self.config = config

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        inputs, targets = batch
        loss = self.model.loss(inputs, targets)
        self.log("passkey_loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        base_lr = self.config.stages[0].lr
        optimizer = torch.optim.AdamW(self.model.parameters(), lr=base_lr, weight_decay=0.0)
        warmup = max(1, self.config.warmup_steps)

        def scale(step: int) -> float:
            return min(1.0, (step + 1) / warmup) * self.config.stage_at(step).lr / base_lr

        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, scale)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def finetune_passkey(
    model: CausalLM, task: PasskeyTask, config: PasskeyFinetuneConfig | None = None
) -> float:
    """Train ``model`` in place on passkey prompts; returns the last training loss."""
    config = config or PasskeyFinetuneConfig()
    longest = max(stage.max_context for stage in config.stages)
    if longest > model.config.max_seq_len:
        raise ValueError(
            f"PasskeyFinetuneConfig: max_context={longest} exceeds the model's max_seq_len={model.config.max_seq_len}"
        )
    with _quiet_lightning():
        trainer = L.Trainer(
            max_steps=config.steps,
            accelerator="auto",
            devices=1,
            logger=False,
            enable_checkpointing=False,
            enable_model_summary=False,
            enable_progress_bar=config.progress_bar,
            gradient_clip_val=1.0,
        )
        model.train()
        trainer.fit(PasskeyFinetune(model, config), DataLoader(PasskeyStream(task, config), batch_size=None))
    model.eval()
    return float(trainer.callback_metrics["passkey_loss"])


@contextlib.contextmanager
def _quiet_lightning():
    """An evaluation helper, not a training run: keep Lightning's start-up banner out of the report."""
    logger = logging.getLogger("lightning.pytorch")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)
