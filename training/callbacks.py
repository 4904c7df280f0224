"""Callbacks kvforge adds to Lightning's: token throughput (+ MFU) and the export at the end of fit."""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ThroughputMonitor
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from .export import export_dtype, export_model
from .shard_transfer import GatheredWeights


def _rows(batch: dict) -> int:
    return batch["input_ids"].shape[0]


def _tokens(batch: dict) -> int:
    return batch["input_ids"].numel()


class TokenThroughput(ThroughputMonitor):
    """Lightning's ``ThroughputMonitor`` for token blocks: ``train/device/items_per_sec`` is tokens/s per
    device (``train/items_per_sec`` over all devices when there are several), and
    ``train/device/mfu`` appears where Lightning knows the device's peak FLOPs (GPUs), from
    ``KVForgeLM.flops_per_batch`` (``arch.flops_per_token``)."""

    def __init__(self, window_size: int = 20) -> None:
        super().__init__(batch_size_fn=_rows, length_fn=_tokens, window_size=window_size)


class HFExport(pl.Callback):
    """At the end of ``fit``, write the trained model as a Hugging Face directory with its tokenizer
    (through ``kvforge.conversion.save_pretrained``, a decoder layer at a time; under FSDP2 each layer is
    gathered to global rank 0 as it is written).

    Args:
        dirpath: output directory; ``None`` = ``<run dir>/hf``.
        enabled: ``False`` skips the export.
        dtype: ``fp32``, ``bf16`` or ``fp16``; ``None`` = bf16 (fp16) when the run computed in it, else
            the weights' dtype.
    """

    def __init__(self, dirpath: str | None = None, enabled: bool = True, dtype: str | None = None) -> None:
        self.dirpath, self.enabled, self.dtype = dirpath, enabled, dtype

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Keep the run's tokenizer next to the run (a trained BPE lives in a cache otherwise), so that
        # exports from this run's checkpoints can always ship it.
        datamodule = trainer.datamodule
        source = getattr(datamodule, "tokenizer_dir", None)
        if source is None:
            return
        local = Path(trainer.default_root_dir) / "tokenizer"
        if trainer.is_global_zero and Path(source).resolve() != local.resolve():
            local.mkdir(parents=True, exist_ok=True)
            for file in Path(source).iterdir():
                if file.is_file() and (
                    file.name.startswith(("tokenizer", "special_tokens")) or file.suffix == ".model"
                ):
                    shutil.copy2(file, local / file.name)
        pl_module.tokenizer_dir = str(local)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.enabled:
            return
        weights = export_weights(pl_module.model)
        gathered = isinstance(weights, GatheredWeights)
        if not trainer.is_global_zero:
            if gathered:
                weights.serve()  # rank 0 gathers the model layer by layer as it writes
            return
        out = Path(self.dirpath) if self.dirpath else Path(trainer.default_root_dir) / "hf"
        try:
            dtype = self.dtype or export_dtype(trainer.precision)
            export_model(pl_module.config, weights, out, pl_module.tokenizer_dir, overwrite=True, dtype=dtype)
        except ValueError as err:  # a form no export family covers yet: the checkpoint still has it
            rank_zero_warn(f"HF export skipped: {err}")
            return
        finally:
            if gathered:
                weights.finish()
        rank_zero_info(f"Exported the trained model to {out}")


def export_weights(model) -> Mapping:
    """What the export reads: under FSDP2 the full tensors gathered a layer at a time as rank 0 writes them
    (:class:`~kvforge.training.shard_transfer.GatheredWeights`), never the whole model at once; otherwise the
    model's own tensors (cast and moved to the CPU a layer at a time by the writer)."""
    if hasattr(model, "reshard"):  # an FSDP2 module
        return GatheredWeights(model)
    return model.state_dict()


def full_state_dict(model) -> dict:
    """The unsharded state dict on CPU (gathered whole under FSDP2: for tests and small models; the export
    streams instead, :func:`export_weights`)."""
    if hasattr(model, "reshard"):  # an FSDP2 module
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {name: tensor.detach().cpu() for name, tensor in model.state_dict().items()}
