"""Fail fast when a run cannot fit: estimate per-device memory before the model is even built.

:class:`MemoryCheck` runs in ``setup`` (before ``configure_model`` materialises the weights) and
compares ``kvforge.arch.estimate_training_memory`` — weights, gradients, AdamW state, activations for
one micro-batch, the chunked loss, FSDP2's sharding and gathered copies, and a distillation teacher in
the compute dtype, sharded like the student — against the memory the device has free (CUDA: ``torch.cuda.mem_get_info``; CPU: available
system RAM). The estimate is within ~20 % of autograd's saved tensors, so only a clear overflow stops
the run: the budget is ``(1 - margin)`` of the free memory. ``--memory_check false`` skips it.
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy
from lightning.pytorch.utilities import rank_zero_info

from kvforge.arch.memory import LOSS_CHUNK, GiB, MemoryEstimate, estimate_training_memory

# Lightning precision → (parameter dtype, activation dtype).
PRECISION_DTYPES = {
    "32-true": (torch.float32, torch.float32),
    "32": (torch.float32, torch.float32),
    "bf16-mixed": (torch.float32, torch.bfloat16),
    "16-mixed": (torch.float32, torch.float16),
    "bf16-true": (torch.bfloat16, torch.bfloat16),
    "16-true": (torch.float16, torch.float16),
    "64-true": (torch.float64, torch.float64),
}


class DoesNotFitError(ValueError):
    """The estimated memory of a run exceeds what the device has free."""


def available_memory(device: torch.device) -> int:
    """Bytes free on ``device`` now."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    import psutil

    return psutil.virtual_memory().available


def compute_dtype(precision) -> torch.dtype:
    """The dtype a Lightning precision computes in (the teacher is held in it)."""
    return _dtypes(precision)[1]


def _dtypes(precision) -> tuple[torch.dtype, torch.dtype]:
    precision = str(precision)
    if precision not in PRECISION_DTYPES:
        raise ValueError(
            f"trainer.precision={precision!r}: the memory check knows {sorted(PRECISION_DTYPES)}"
        )
    return PRECISION_DTYPES[precision]


def estimate_run(trainer: pl.Trainer, pl_module: pl.LightningModule) -> MemoryEstimate:
    """Per-device estimate for this trainer's precision/strategy and the datamodule's micro-batch: the
    student (sharded under FSDP2, with DDP's gradient buckets under DDP), the teacher in the compute dtype
    (sharded like the student), activations with or without checkpointing, and the loss chunks."""
    param_dtype, activation_dtype = _dtypes(trainer.precision)
    data = trainer.datamodule
    fsdp = isinstance(trainer.strategy, ModelParallelStrategy)
    distill = getattr(pl_module, "distill", None)
    return estimate_training_memory(
        pl_module.config,
        data.batch_size,
        data.block_size,
        param_dtype=param_dtype,
        activation_dtype=activation_dtype,
        gradient_checkpointing=pl_module.activation_checkpointing,
        shards=trainer.world_size if fsdp else 1,
        teacher=getattr(pl_module, "teacher_config", None),
        loss_chunk=distill.chunk_size if distill is not None else LOSS_CHUNK,
        gradient_buckets=isinstance(trainer.strategy, DDPStrategy) and trainer.world_size > 1,
    )


def process_bytes() -> int:
    """Resident bytes of this process now (what it holds before training allocates anything)."""
    import psutil

    return psutil.Process().memory_info().rss


def check_fits(estimate: MemoryEstimate, available: int, margin: float, where: str) -> None:
    """``available`` is what is free now, so what the process already holds (``runtime``) is not counted."""
    budget = int(available * (1 - margin))
    if estimate.training <= budget:
        return
    rows = "; ".join(f"{name} {value}" for name, value in estimate.rows())
    raise DoesNotFitError(
        f"this run needs about {estimate.training / GiB:,.3f} GiB per device ({rows}) but {where} has "
        f"{available / GiB:,.3f} GiB free (budget {budget / GiB:,.3f} GiB with memory_margin={margin}). "
        f"Suggestion: {estimate.suggestion()}. If you know better, pass --memory_check false"
    )


class MemoryCheck(pl.Callback):
    """Args:
    margin: share of the free memory kept out of the budget (allocator fragmentation, CUDA context,
        the estimate's error).
    available_bytes: free memory to compare against instead of asking the device.
    """

    def __init__(self, margin: float = 0.1, available_bytes: int | None = None) -> None:
        if not 0 <= margin < 1:
            raise ValueError(f"memory_margin={margin}: must be in [0, 1)")
        self.margin, self.available_bytes = margin, available_bytes
        self.estimate: MemoryEstimate | None = None  # this rank's, once the check ran

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        data = trainer.datamodule
        if stage != "fit" or not (hasattr(data, "batch_size") and hasattr(data, "block_size")):
            return  # the estimate needs the micro-batch shape of kvforge's TextDataModule
        device = trainer.strategy.root_device
        available = self.available_bytes if self.available_bytes is not None else available_memory(device)
        if device.type == "cpu" and self.available_bytes is None:
            available //= max(1, trainer.num_devices)  # CPU processes of this node share its RAM
        runtime = process_bytes() if device.type == "cpu" else 0  # before a one-process run loads weights
        estimate = estimate_run(trainer, pl_module)
        estimate.runtime = runtime
        self.estimate = estimate
        check_fits(estimate, available, self.margin, f"{device}")
        rank_zero_info(
            f"Memory check: about {estimate.training / GiB:,.3f} GiB per device of {available / GiB:,.3f} GiB free"
            + (f" (peak about {estimate.total / GiB:,.3f} GiB per process)" if estimate.runtime else "")
        )
