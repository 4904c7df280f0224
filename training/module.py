"""``KVForgeLM``: the LightningModule for pre-training and uptraining.

Lightning runs the loop, precision, strategy, accumulation, clipping and checkpointing; this module
says what a step computes. The model is built in ``configure_model`` (under FSDP2 on the meta device,
sharded, then materialised) from a ``ModelConfig`` or from ``init_from`` (optionally converted, see
``model_source``). Where the weights come from is resolved lazily, on first use of ``config``: in one
process right there; in a multi-process run after global rank 0 converted once (``prepare_data``, see
``setup_once``), and under FSDP2 only rank 0 reads the weights, broadcasting them into the others' shards.
The distillation teacher is deliberately not a registered sub-module: it is frozen, never checkpointed
(it is rebuilt from its directory), held in the run's compute dtype and, under FSDP2, sharded like the
student (``teacher``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from pathlib import Path
from typing import Any, Literal

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
from kvforge.conversion import load_config
from kvforge.conversion.host import DEFAULT_HOST_ALLOCATOR, HostAllocator
from kvforge.conversion.loading import CHECKPOINT_KEY

from .distill import DistillationConfig
from .fsdp import apply_fsdp2, load_full_state
from .memory_check import compute_dtype
from .model_source import (
    CalibrationConfig,
    Convert,
    StartingPoint,
    check_convert,
    locate_starting_point,
    resolve_starting_point,
)
from .optim import OptimizerConfig, build_optimizer
from .setup_once import conversion_recipe, prepare_converted, read_converted
from .teacher import build_teacher, teacher_head_inputs
from .trainable import apply_trainable_, check_trainable


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
    trainable: which parameters train at all (``TRAINABLE``): ``all``, or ``attention`` (every
        ``self_attn`` parameter; the rest frozen, without weight gradients: cheap CPU uptraining).
    attention_backend: overrides the model's attention backend (``eager``, ``sdpa``, ``flash``, ...).
    activation_checkpointing: recompute each decoder layer in the backward pass (less memory).
    compile: ``torch.compile`` each decoder layer.
    host_allocator: ``trim`` (default): pin glibc's mmap threshold at 4 MiB and give its free heap pages
        back three times a training step (``malloc_trim``); ``pinned``: pin the threshold at 128 KiB, so
        that every freed tensor of that size or more leaves at once; ``default``: leave the allocator as it
        is (see ``host_allocator``).
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
        trainable: str = "all",
        attention_backend: str | None = None,
        activation_checkpointing: bool = False,
        compile: bool = False,
        host_allocator: Literal["pinned", "trim", "default"] = DEFAULT_HOST_ALLOCATOR,
    ) -> None:
        super().__init__()
        # First, before any weights are read: in this process, then in each rank's first hook (prepare_data
        # on rank 0, setup) for ranks that receive this module pickled.
        self.host_allocator = HostAllocator(host_allocator)
        self.host_allocator.apply()
        self.distill = distill if distill is not None and distill.alpha < 1 else None
        self.optim = optim or OptimizerConfig()
        if (model is None) == (init_from is None):
            raise ValueError(
                "give exactly one of model (a ModelConfig: train from scratch) and init_from (a model directory: "
                f"uptrain); got model={'set' if model is not None else None}, init_from={init_from!r}"
            )
        if init_from is not None and not Path(init_from).is_dir():
            raise FileNotFoundError(f"model.init_from={init_from!r} is not a directory")
        if converted_only_steps < 0:
            raise ValueError(f"converted_only_steps={converted_only_steps}: must be >= 0")
        if convert:
            check_convert(convert)
        check_trainable(trainable)
        if converted_only_steps and not convert:
            raise ValueError(
                f"converted_only_steps={converted_only_steps} trains only the parameters a conversion created or "
                "changed, but there is no model.convert"
            )
        self._recipe = (model, init_from, convert, calibration, distill.teacher if distill else None)
        self._start: StartingPoint | None = None
        self.attention_backend = attention_backend
        self.tokenizer_source = init_from
        self.tokenizer_dir: str | None = init_from
        self.converted_only_steps = converted_only_steps
        self.trainable = trainable
        self.activation_checkpointing, self.compile_layers = activation_checkpointing, compile
        self.prepare_data_per_node = False  # the one-time conversion runs on global rank 0 only
        self.model: CausalLM | None = None
        self.__dict__["teacher"] = None  # unregistered on purpose, see the module docstring
        self.flops_per_batch: int | None = None
        self.save_hyperparameters(
            _plain(
                {
                    "model": model.to_dict() if model is not None else None,
                    "init_from": init_from,
                    "convert": convert,
                    "calibration": dataclasses.asdict(calibration) if calibration else None,
                    "distill": dataclasses.asdict(self.distill) if self.distill else None,
                    "optim": dataclasses.asdict(self.optim),
                    "converted_only_steps": converted_only_steps,
                    "trainable": trainable,
                }
            )
        )

    # ------------------------------------------------------------------ where the weights start
    @property
    def start(self) -> StartingPoint:
        """Resolved on first use: in one process, load (and convert) here; in a multi-process run, read what
        global rank 0 prepared (``prepare_data``)."""
        if self._start is None:
            self._start = self._resolve()
            if self.converted_only_steps and not self._start.changed:
                raise ValueError(
                    f"converted_only_steps={self.converted_only_steps} trains only the parameters a conversion "
                    "created or changed, but model.convert changed none"
                )
            self.hparams["model"] = self.config.to_dict()
            self.hparams["parameters_changed_by_conversion"] = len(self._start.changed)
        return self._start

    def _resolve(self) -> StartingPoint:
        model, init_from, convert, calibration, teacher_dir = self._recipe
        if not _multi_process():
            work_dir = self._trainer.default_root_dir if self._trainer is not None else None
            return resolve_starting_point(
                model, init_from, convert, calibration, teacher_dir, self.distill is not None, work_dir
            )
        weights_dir, changed = init_from, frozenset()
        if convert:
            recipe = conversion_recipe(init_from, convert, calibration)
            weights_dir, changed = read_converted(self.trainer.default_root_dir, recipe)
        return locate_starting_point(
            model, weights_dir, teacher_dir or init_from, self.distill is not None, changed, init_from
        )

    def prepare_data(self) -> None:
        self.host_allocator.apply()
        _, init_from, convert, calibration, _ = self._recipe
        if convert and _multi_process():
            prepare_converted(
                self.trainer.default_root_dir, conversion_recipe(init_from, convert, calibration), calibration
            )

    @property
    def config(self) -> ModelConfig:
        config = self.start.config
        return config.replace(attention_backend=self.attention_backend) if self.attention_backend else config

    @property
    def changed_parameters(self) -> frozenset[str]:
        return self.start.changed

    @property
    def teacher_config(self) -> ModelConfig | None:
        return self.start.teacher_config

    def data_config(self) -> ModelConfig:
        """A config with the ``vocab_size`` and ``max_seq_len`` the data must fit, read without converting
        (no transform changes them), so that data preparation never triggers the conversion."""
        if self._start is None and self._recipe[1] is not None:
            return load_config(self._recipe[1])[0]
        return self.config

    # ------------------------------------------------------------------ model construction
    def configure_model(self) -> None:
        if self.model is not None:
            return
        fsdp = self._trainer is not None and isinstance(self.trainer.strategy, ModelParallelStrategy)
        start = self.start
        with torch.device("meta") if fsdp else contextlib.nullcontext():
            model = CausalLM(self.config)
        model.model.gradient_checkpointing = self.activation_checkpointing
        if self.compile_layers:
            for layer in model.model.layers:
                layer.compile()
        mesh = self.trainer.strategy.device_mesh["data_parallel"] if fsdp else None
        if fsdp:
            apply_fsdp2(model, mesh, bf16_compute=str(self.trainer.precision).startswith("bf16"))
            model.to_empty(device=self.trainer.strategy.root_device)
            model.init_weights()  # also re-derives the RoPE tables, which to_empty leaves uninitialised
            if start.has_weights:
                load_full_state(model, start.weights(rank_zero_only=True, lazy=True))
        elif start.has_weights:
            model.load_state_dict(start.weights())
        start.state_dict = None
        apply_trainable_(model, self.trainable)
        self.model = model
        if start.teacher_config is not None:
            device = self.trainer.strategy.root_device if self._trainer is not None else torch.device("cpu")
            dtype = compute_dtype(self.trainer.precision) if self._trainer is not None else torch.float32
            teacher_state = start.teacher_weights(rank_zero_only=fsdp, lazy=fsdp)
            self.__dict__["teacher"] = build_teacher(start.teacher_config, teacher_state, dtype, device, mesh)
            start.teacher = None

    def setup(self, stage: str) -> None:
        self.host_allocator.apply()
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is not None:  # for ThroughputMonitor's FLOPs and MFU
            block, batch = datamodule.block_size, datamodule.batch_size
            per_token = flops_per_token(self.config, block)
            if self.teacher_config is not None:
                per_token += forward_flops_per_token(self.teacher_config, block)
            self.flops_per_batch = per_token * block * batch

    # ------------------------------------------------------------------ steps
    # host_allocator: trim: each step's pass gives back what the one before freed
    def on_train_batch_start(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self.host_allocator.release()

    def on_before_backward(self, loss: torch.Tensor) -> None:
        self.host_allocator.release()

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        teacher = self.__dict__["teacher"]
        inputs, targets = batch["input_ids"], batch["targets"]
        if teacher is None:
            ce = self.model.loss(inputs, targets, **self._document_kwargs(batch))
            loss, kl = ce, None
        else:
            documents = self._document_kwargs(batch)
            teacher_hidden, teacher_weight = teacher_head_inputs(teacher, inputs, **documents)
            loss, ce, kl = self.model.distillation_loss(
                inputs,
                targets,
                teacher_hidden,
                teacher_weight,
                alpha=self.distill.alpha,
                temperature=self.distill.temperature,
                reverse=self.distill.kl == "reverse",
                chunk_size=self.distill.chunk_size,
                teacher_softcap=teacher.config.final_logit_softcap,
                **documents,
            )
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
        self.host_allocator.release()

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint[CHECKPOINT_KEY] = {
            "format": 1,
            "model_config": self.config.to_dict(),
            "tokenizer_dir": str(self.tokenizer_dir) if self.tokenizer_dir else None,
            "precision": str(self.trainer.precision) if self._trainer is not None else None,
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


def _multi_process() -> bool:
    return (
        torch.distributed.is_available()
        and torch.distributed.is_initialized()
        and torch.distributed.get_world_size() > 1
    )


def _plain(data: dict) -> dict:
    """JSON types only (tuples become lists): checkpoints must reload with ``weights_only=True`` and
    loggers write the hyperparameters as YAML."""
    return json.loads(json.dumps(data))
