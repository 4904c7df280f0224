"""FSDP2 through Lightning's ``ModelParallelStrategy``: ``--trainer.strategy fsdp2``.

``ModelParallelStrategy`` defaults to tensor parallelism across the devices of a node; kvforge uses it
as pure data parallelism (every device a data-parallel rank), sharding each decoder layer with
``fully_shard`` (torchtitan's recipe) and the root module last, which then owns the embedding, the
final norm and the LM head. ``CausalLM.loss`` reads the LM head's weight directly (fused chunked
cross-entropy), so it is registered as a forward method: FSDP gathers the root's parameters around it.
"""

from __future__ import annotations

import warnings

import torch
from lightning.pytorch.strategies import ModelParallelStrategy, StrategyRegistry

from kvforge.arch import CausalLM

FSDP2_NAME = "fsdp2"
# A decoder layer returns its K/V views for later layers that share them (cross-layer attention); nothing
# modifies them in place, which is the case this FSDP2 warning is about.
warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(FSDPDecoderLayer\) returned a view tensor")


class FSDP2Strategy(ModelParallelStrategy):
    """``ModelParallelStrategy`` with data-parallel size = all devices and tensor-parallel size 1."""

    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes
        self._tensor_parallel_size = 1
        super().setup_environment()


if FSDP2_NAME not in StrategyRegistry:
    StrategyRegistry.register(
        FSDP2_NAME, FSDP2Strategy, description="FSDP2: fully_shard per decoder layer, pure data parallel"
    )


def apply_fsdp2(model: CausalLM, mesh, *, bf16_compute: bool) -> None:
    """Shard ``model`` in place over the 1-D data-parallel ``mesh``."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    # bf16 all-gathers and compute, fp32 gradient reduction (torchtitan's default policy).
    policy = (
        MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if bf16_compute
        else MixedPrecisionPolicy()
    )
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    register_fsdp_forward_method(model, "loss")
