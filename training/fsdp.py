"""FSDP2 through Lightning's ``ModelParallelStrategy``: ``--trainer.strategy fsdp2``.

``ModelParallelStrategy`` defaults to tensor parallelism across the devices of a node; kvforge uses it
as pure data parallelism (every device a data-parallel rank), sharding each decoder layer with
``fully_shard`` (torchtitan's recipe) and the root module last, which then owns the embedding, the
final norm and the LM head. ``CausalLM.loss`` and ``CausalLM.distillation_loss`` read the LM head's
weight directly (fused chunked losses) and ``CausalLM.hidden_states`` stops before it, so they are
registered as forward methods: FSDP gathers the root's parameters around them. Weights are loaded by
broadcasting global rank 0's weights into the shards one tensor at a time, read from disk as they are
sent (``load_full_state``); the frozen teacher is sharded the same way (``shard_frozen``).
"""

from __future__ import annotations

import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch
from lightning.pytorch.strategies import ModelParallelStrategy, StrategyRegistry

from kvforge.arch import CausalLM
from kvforge.conversion.atomic import remove_stale_temporaries, replace_directory

from .shard_transfer import broadcast_into_shards

FSDP2_NAME = "fsdp2"
# A decoder layer returns its K/V views for later layers that share them (cross-layer attention); nothing
# modifies them in place, which is the case this FSDP2 warning is about.
warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(FSDPDecoderLayer\) returned a view tensor")


class FSDP2Strategy(ModelParallelStrategy):
    """``ModelParallelStrategy`` with data-parallel size = all devices and tensor-parallel size 1, and
    crash-safe distributed checkpoints.

    Lightning writes a sharded checkpoint into the existing ``last.ckpt/`` directory, overwriting its
    shards and metadata in place: a kill mid-save leaves neither the old nor the new checkpoint. Here
    every rank writes into a temporary sibling that rank 0 then renames over it (fsynced, see
    ``kvforge.conversion.atomic.replace_directory``).
    """

    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes
        self._tensor_parallel_size = 1
        super().setup_environment()

    def save_checkpoint(self, checkpoint: dict, filepath, storage_options=None) -> None:
        if not self._save_distributed_checkpoint:  # one full-state file through the (atomic) CheckpointIO
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        path = Path(self.broadcast(str(filepath)))
        tmp = None
        if self.global_rank == 0:
            path.parent.mkdir(parents=True, exist_ok=True)
            remove_stale_temporaries(path)  # what a killed save left
            tmp = tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent)
        tmp = Path(self.broadcast(tmp))
        super().save_checkpoint(checkpoint, tmp, storage_options)
        self.barrier("kvforge_checkpoint_written")
        if self.global_rank == 0:
            replace_directory(tmp, path)
        self.barrier("kvforge_checkpoint_published")


if FSDP2_NAME not in StrategyRegistry:
    StrategyRegistry.register(
        FSDP2_NAME, FSDP2Strategy, description="FSDP2: fully_shard per decoder layer, pure data parallel"
    )


def apply_fsdp2(model: CausalLM, mesh, *, bf16_compute: bool) -> None:
    """Shard ``model`` in place over the 1-D data-parallel ``mesh``."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    # bf16 all-gathers and compute, fp32 gradient reduction (torchtitan's default policy).
    policy = (
        MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if bf16_compute
        else MixedPrecisionPolicy()
    )
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    _register_forward_methods(model)


def shard_frozen(model: CausalLM, mesh) -> None:
    """Shard a frozen model (the distillation teacher) in place, keeping its parameters' dtype. The root
    reshards after forward too (FSDP2 keeps a root's parameters gathered for the backward pass by default;
    a frozen model has none)."""
    from torch.distributed.fsdp import fully_shard

    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh, reshard_after_forward=True)
    fully_shard(model, mesh=mesh, reshard_after_forward=True)
    _register_forward_methods(model)


def _register_forward_methods(model: CausalLM) -> None:
    """Methods besides ``forward`` that read the root's parameters (embedding, final norm, LM head)."""
    from torch.distributed.fsdp import register_fsdp_forward_method

    for name in ("loss", "hidden_states", "distillation_loss"):
        register_fsdp_forward_method(model, name)


def load_full_state(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor] | None) -> None:
    """Load full (unsharded) weights into an FSDP2 model: global rank 0 holds them (the other ranks pass
    ``None``) - a dict, or better a lazy mapping that reads each tensor from disk when asked - and
    broadcasts one tensor at a time; every rank keeps only its own shard of each
    (:func:`~kvforge.training.shard_transfer.broadcast_into_shards`)."""
    broadcast_into_shards(model, state_dict)
