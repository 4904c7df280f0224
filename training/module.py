"""``KVForgeLM``: the LightningModule for pre-training and uptraining.

Lightning runs the loop, precision, strategy, accumulation, clipping and checkpointing; this module
says what a step computes. The model is built in ``configure_model`` (under FSDP2 on the meta device,
sharded, then materialised) from a ``ModelConfig`` or from ``init_from`` (optionally converted, see
``model_source``). The distillation teacher is deliberately not a registered sub-module: it is frozen,
never checkpointed (it is rebuilt from its directory) and not sharded (each rank holds a copy).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import ModelParallelStrategy

from kvforge.arch import (
    CausalLM,
    ModelConfig,
    flops_per_token,
    forward_flops_per_token,
    kv_bytes_per_token,
    mha_equivalent,
)

from .distill import DistillationConfig, distillation_loss
from .fsdp import apply_fsdp2
from .loading import CHECKPOINT_KEY
from .model_source import CalibrationConfig, Convert, resolve_starting_point
from .optim import OptimizerConfig, build_optimizer


class KVForgeLM(pl.LightningModule):
    """Args:
    model: architecture of a model trained from scratch (exclusive with ``init_from``).
    init_from: HF/kvforge model directory whose weights (and tokenizer) the run starts from.
    convert: transform applied to ``init_from`` first: ``{to: <TRANSFORMS name>, <its options>}``, or a
        list of them applied in order.
    calibration: text the transform may run the source model on.
    distill: teacher, α, temperature and KL direction; ``None`` or ``alpha: 1`` = plain cross-entropy.
    optim: AdamW and its learning-rate schedule.
    converted_only_steps: optimizer steps at the start that update only the parameters the transform
        created or changed (the rest keep their weights: their gradients are dropped), then all.
    attention_backend: overrides the model's attention backend (``eager``, ``sdpa``, ``flash``, ...).
    activation_checkpointing: recompute each decoder layer in the backward pass (less memory).
    compile: ``torch.compile`` each decoder layer.
    """

    def __init__(
        self,
        model: ModelConfig | None = None,
        init_from: str | None = None,
        convert: Convert | None = None,
        calibration: CalibrationConfig | None = None,
        distill: DistillationConfig | None = None,
        optim: OptimizerConfig | None = None,
        converted_only_steps: int = 0,
        attention_backend: str | None = None,
        activation_checkpointing: bool = False,
        compile: bool = False,
    ) -> None:
        super().__init__()
        self.distill = distill if distill is not None and distill.alpha < 1 else None
        self.optim = optim or OptimizerConfig()
        start = resolve_starting_point(
            model,
            init_from,
            convert,
            calibration,
            distill.teacher if distill else None,
            self.distill is not None,
        )
        if converted_only_steps < 0:
            raise ValueError(f"converted_only_steps={converted_only_steps}: must be >= 0")
        if converted_only_steps and not start.changed:
            raise ValueError(
                f"converted_only_steps={converted_only_steps} trains only the parameters a conversion created or "
                "changed, but " + ("model.convert changed none" if convert else "there is no model.convert")
            )
        self.config = (
            start.config.replace(attention_backend=attention_backend) if attention_backend else start.config
        )
        self.tokenizer_source = start.tokenizer_dir
        self.tokenizer_dir: str | None = start.tokenizer_dir
        self.changed_parameters = start.changed
        self.converted_only_steps = converted_only_steps
        self.activation_checkpointing, self.compile_layers = activation_checkpointing, compile
        self._initial_state = start.state_dict
        self._teacher_source = start.teacher
        self._teacher_config = start.teacher.config if start.teacher else None
        self.model: CausalLM | None = None
        self.__dict__["teacher"] = None  # unregistered on purpose, see the module docstring
        self.flops_per_batch: int | None = None
        self.save_hyperparameters(
            _plain(
                {
                    "model": self.config.to_dict(),
                    "init_from": init_from,
                    "convert": convert,
                    "calibration": dataclasses.asdict(calibration) if calibration else None,
                    "distill": dataclasses.asdict(self.distill) if self.distill else None,
                    "optim": dataclasses.asdict(self.optim),
                    "converted_only_steps": converted_only_steps,
                    "parameters_changed_by_conversion": len(self.changed_parameters),
                }
            )
        )

    # ------------------------------------------------------------------ model construction
    def configure_model(self) -> None:
        if self.model is not None:
            return
        fsdp = self._trainer is not None and isinstance(self.trainer.strategy, ModelParallelStrategy)
        with torch.device("meta") if fsdp else contextlib.nullcontext():
            model = CausalLM(self.config)
        model.model.gradient_checkpointing = self.activation_checkpointing
        if self.compile_layers:
            for layer in model.model.layers:
                layer.compile()
        if fsdp:
            mesh = self.trainer.strategy.device_mesh["data_parallel"]
            apply_fsdp2(model, mesh, bf16_compute=str(self.trainer.precision).startswith("bf16"))
            model.to_empty(device=self.trainer.strategy.root_device)
            model.init_weights()  # also re-derives the RoPE tables, which to_empty leaves uninitialised
            if self._initial_state is not None:
                from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

                set_model_state_dict(
                    model, self._initial_state, options=StateDictOptions(full_state_dict=True)
                )
        elif self._initial_state is not None:
            model.load_state_dict(self._initial_state)
        self._initial_state = None
        self.model = model
        if self._teacher_source is not None:
            teacher = CausalLM(self._teacher_source.config)
            teacher.load_state_dict(self._teacher_source.state_dict)
            self.__dict__["teacher"] = teacher.requires_grad_(False).eval()
            self._teacher_source = None

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is not None:  # for ThroughputMonitor's FLOPs and MFU
            block, batch = datamodule.block_size, datamodule.batch_size
            per_token = flops_per_token(self.config, block)
            if self._teacher_config is not None:
                per_token += forward_flops_per_token(self._teacher_config, block)
            self.flops_per_batch = per_token * block * batch

    def on_fit_start(self) -> None:
        teacher = self.__dict__["teacher"]
        if teacher is not None:
            weight = self.model.lm_head.weight
            self.__dict__["teacher"] = teacher.to(device=self.device, dtype=weight.dtype)

    on_validation_start = on_fit_start

    # ------------------------------------------------------------------ steps
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        teacher = self.__dict__["teacher"]
        inputs, targets = batch["input_ids"], batch["targets"]
        if teacher is None:
            ce = self.model.loss(inputs, targets, **self._document_kwargs(batch))
            loss, kl = ce, None
        else:
            documents = self._document_kwargs(batch)
            with torch.no_grad():
                teacher_logits = teacher(inputs, **documents)
            out = distillation_loss(self.model(inputs, **documents), teacher_logits, targets, self.distill)
            loss, ce, kl = out["loss"], out["ce"], out["kl"]
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/lr", self.lr_schedulers().get_last_lr()[0])
        self.log("train/ppl", torch.exp(ce.detach()))
        if kl is not None:
            self.log("train/ce", ce)
            self.log("train/kl", kl)
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.model.loss(batch["input_ids"], batch["targets"], **self._document_kwargs(batch))
        self.log("val/loss", loss, prog_bar=True, sync_dist=True)
        self.log("val/ppl", torch.exp(loss), sync_dist=True)
        return loss

    @staticmethod
    def _document_kwargs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Packed-document masking: the data module leaves ``document_ids`` out where no block needs it."""
        return {"document_ids": batch["document_ids"]} if "document_ids" in batch else {}

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self):
        # trainer.max_steps, not estimated_stepping_batches: the latter builds the train dataloader before
        # the checkpoint is restored (Lightning issue #20550), which would lose the resumed data position.
        total = self.trainer.max_steps if self.trainer.max_steps > 0 else None
        optimizer, scheduler = build_optimizer(self.model, self.optim, total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.global_step < self.converted_only_steps:
            for name, param in self.model.named_parameters():
                if name not in self.changed_parameters:
                    param.grad = None  # AdamW skips it: no update, no decay, no moments
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        if grads:
            norm = torch.nn.utils.get_total_norm(grads)
            self.log("train/grad_norm", norm.full_tensor() if hasattr(norm, "full_tensor") else norm)

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint[CHECKPOINT_KEY] = {
            "format": 1,
            "model_config": self.config.to_dict(),
            "tokenizer_dir": str(self.tokenizer_dir) if self.tokenizer_dir else None,
        }

    def architecture_summary(self) -> dict[str, Any]:
        """Figures logged next to the run configuration (KV bytes at the full context, bf16 cache)."""
        with torch.device("meta"):
            parameters = CausalLM(self.config).num_parameters()
        seq = self.config.max_seq_len
        kv_bytes = kv_bytes_per_token(self.config, seq, "bf16")
        return {
            "parameters": parameters,
            "kv_bytes_per_token": kv_bytes,
            "kv_bytes_per_token_vs_mha": kv_bytes
            / kv_bytes_per_token(mha_equivalent(self.config), seq, "bf16"),
            "train_flops_per_token": flops_per_token(self.config, seq),
        }


def _plain(data: dict) -> dict:
    """JSON types only (tuples become lists): checkpoints must reload with ``weights_only=True`` and
    loggers write the hyperparameters as YAML."""
    return json.loads(json.dumps(data))
