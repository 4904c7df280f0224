"""A short fine-tune that teaches a small model the passkey format.

A 260K-parameter TinyStories model was never trained to retrieve anything, so its zero-shot passkey
accuracy is 0 at every length and says nothing about its attention form. A few hundred steps on
generated passkey prompts (loss on the answer tokens only, contexts spread over the whole range
that will be evaluated) teach it to copy the key (an induction-head pattern); after that, what
limits retrieval is the attention form - a sliding window shorter than the needle's distance cannot
see the needle. Evaluation prompts use a different seed from the training prompts.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass

import lightning as L
import torch
from torch.utils.data import DataLoader, IterableDataset

from kvforge.arch import CausalLM
from kvforge.kernels import IGNORE_INDEX

from .passkey import PasskeyTask


@dataclass
class PasskeyFinetuneConfig:
    steps: int = 600
    batch_size: int = 16
    lr: float = 3e-3
    warmup_steps: int = 30
    contexts: tuple[int, ...] = (64, 128, 192, 256, 320, 384, 448, 512)
    seed: int = 1234  # differs from the evaluation seed, so no evaluation prompt is trained on
    progress_bar: bool = False


class PasskeyStream(IterableDataset):
    """Endless batches of passkey prompts; each batch shares one context length (no padding)."""

    def __init__(self, task: PasskeyTask, config: PasskeyFinetuneConfig) -> None:
        self.task = task
        self.config = config

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        rng = random.Random(self.config.seed)
        while True:
            context = rng.choice(self.config.contexts)
            rows = [self.task.sample(context, rng.random(), rng) for _ in range(self.config.batch_size)]
            sequences = torch.tensor([row.prompt_ids + row.answer_ids for row in rows])
            targets = torch.full_like(sequences, IGNORE_INDEX)
            for index, row in enumerate(rows):
                start = len(row.prompt_ids)
                targets[index, start - 1 : start - 1 + len(row.answer_ids)] = torch.tensor(row.answer_ids)
            yield sequences[:, :-1], targets[:, :-1]


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
        optimizer = torch.optim.AdamW(self.model.parameters(), lr=self.config.lr, weight_decay=0.0)
        warmup = max(1, self.config.warmup_steps)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def finetune_passkey(
    model: CausalLM, task: PasskeyTask, config: PasskeyFinetuneConfig | None = None
) -> float:
    """Train ``model`` in place on passkey prompts; returns the last training loss."""
    config = config or PasskeyFinetuneConfig()
    too_long = [c for c in config.contexts if c > model.config.max_seq_len]
    if too_long:
        raise ValueError(
            f"PasskeyFinetuneConfig.contexts {too_long} exceed the model's max_seq_len={model.config.max_seq_len}"
        )
    module = PasskeyFinetune(model, config)
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
    trainer.fit(module, DataLoader(PasskeyStream(task, config), batch_size=None))
    model.eval()
    return float(trainer.callback_metrics["passkey_loss"])
