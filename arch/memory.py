"""Memory estimates from the config alone: parameters, gradients, optimizer state, activations, KV.

Used to fail fast before a run that cannot fit (with the numbers and a suggestion) and by
``kvforge inspect``. Activation counts follow what autograd actually saves for this decoder
(measured with ``torch.autograd.graph.saved_tensors_hooks``; tests keep the estimate within 20 %),
in the spirit of Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer
Models": per layer and token, two RMSNorms save input/normalised/output (6·d), the SwiGLU MLP its
three projections' outputs and their product (4·ffn), attention its Q/K/V, output and log-sum-exp
(flash-style kernels never store the score matrix).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvforge.kernels.distillation import LOGIT_BLOCKS

from .config import LayerSpec, ModelConfig
from .forms import form_of
from .kv_bytes import kv_cache_bytes, parse_dtype

GiB = 1024**3
# Bytes per parameter held by the optimizer (AdamW: exp_avg and exp_avg_sq in the parameter dtype).
OPTIMIZER_STATES = {"adamw": 2, "adam": 2, "sgd": 0, "sgd-momentum": 1}
# Rows of the fused head + cross-entropy computed at once (kvforge.kernels.linear_cross_entropy).
LOSS_CHUNK = 1024
# float32 (chunk × vocab) blocks the fused cross-entropy holds at once: the logits (the softmax gradient is
# computed in place) and the compute-dtype product they come from.
CE_LOGIT_BLOCKS = 2
# float32 values per d_model the two RMSNorms of a layer keep per token under autocast (see below).
MIXED_NORM_FP32_VALUES = 5


def count_parameters(config: ModelConfig, layer_index: int | None = None) -> int:
    """Exact parameter count of ``CausalLM(config)`` (tied embeddings counted once), or of its decoder layer
    ``layer_index``."""
    d = config.d_model
    specs = config.layers if layer_index is None else [config.layers[layer_index]]
    total = root_parameters(config) if layer_index is None else 0
    for spec in specs:
        norms = 4 if config.sandwich_norms else 2  # Gemma's sandwich adds a norm after attention and MLP
        total += norms * d + 3 * d * config.ffn_dim  # norms + gated MLP
        total += form_of(spec).parameters(config, spec)
        total += config.n_heads if spec.sinks else 0
    return total


def activation_values_per_token(config: ModelConfig, spec: LayerSpec) -> int:
    """Values autograd keeps per token for one layer's backward (fused attention, no scores): the
    norms and MLP, plus what the layer's form declares for its attention block."""
    norms = 4 if config.sandwich_norms else 2  # Gemma's sandwich norms save 3·d each, like the others
    common = 3 * norms * config.d_model + 4 * config.ffn_dim
    return common + form_of(spec).activation_values(config, spec)


@dataclass
class MemoryEstimate:
    """Bytes per device, by kind. ``total`` is what must fit; ``runtime`` is what the process held before
    training allocated anything (measured, CPU only: the interpreter and its libraries)."""

    parameters: int
    gradients: int
    optimizer: int
    activations: int
    kv_cache: int = 0
    teacher: int = 0  # frozen teacher: its (sharded) weights, hidden states and gathered LM head
    loss: int = 0  # the chunked loss: logit blocks of one chunk, head-weight and hidden-state gradients
    gathered: int = 0  # FSDP2: unsharded copies of the root and of the layers being computed
    runtime: int = 0

    @property
    def training(self) -> int:
        """What training allocates on top of ``runtime``."""
        return (
            self.parameters
            + self.gradients
            + self.optimizer
            + self.activations
            + self.kv_cache
            + self.teacher
            + self.loss
            + self.gathered
        )

    @property
    def total(self) -> int:
        return self.training + self.runtime

    def rows(self) -> list[tuple[str, str]]:
        parts = [
            ("parameters", self.parameters),
            ("gradients", self.gradients),
            ("optimizer state", self.optimizer),
            ("activations", self.activations),
            ("KV cache", self.kv_cache),
            ("teacher", self.teacher),
            ("loss chunks", self.loss),
            ("FSDP2 gathered", self.gathered),
            ("process runtime", self.runtime),
            ("total", self.total),
        ]
        return [(name, f"{value / GiB:,.3f} GiB") for name, value in parts if value or name == "total"]

    def suggestion(self) -> str:
        biggest = max(
            ("activations", self.activations),
            ("parameters, gradients and optimizer state", self.parameters + self.gradients + self.optimizer),
            ("KV cache", self.kv_cache),
            key=lambda item: item[1],
        )[0]
        return {
            "activations": "lower the micro-batch (data.batch_size) and raise trainer.accumulate_grad_batches, "
            "or turn on activation checkpointing",
            "parameters, gradients and optimizer state": "shard them across devices with FSDP2 "
            "(--trainer.strategy ModelParallelStrategy) or train in bf16",
            "KV cache": "lower the batch or the context length, or convert to a form with a smaller cache",
        }[biggest]


def estimate_training_memory(
    config: ModelConfig,
    batch: int,
    seq_len: int,
    *,
    param_dtype: torch.dtype | str = "fp32",
    activation_dtype: torch.dtype | str | None = None,
    optimizer: str = "adamw",
    gradient_checkpointing: bool = False,
    shards: int = 1,
    teacher: ModelConfig | None = None,
    loss_chunk: int = LOSS_CHUNK,
    gradient_buckets: bool = False,
) -> MemoryEstimate:
    """Per-device training memory for micro-batches of ``batch × seq_len`` tokens.

    ``activation_dtype`` is the compute dtype (``bf16`` for bf16-mixed; default: the parameter dtype);
    ``shards`` > 1 is FSDP2 over that many devices: it divides parameters, gradients, optimizer state and
    the teacher, and adds the unsharded copies FSDP2 gathers (the root's embedding, norm and head for
    the whole step, two decoder layers at a time, one layer's gradients before their reduce-scatter).
    ``teacher``: a frozen distillation teacher held in the compute dtype; the loss then applies both LM
    heads chunk by chunk (``kvforge.kernels.distillation``). ``gradient_buckets``: DDP's copy of the
    gradients for its all-reduce.
    """
    if optimizer not in OPTIMIZER_STATES:
        raise ValueError(f"optimizer={optimizer!r}: allowed values are {sorted(OPTIMIZER_STATES)}")
    if batch <= 0 or seq_len <= 0 or shards <= 0 or loss_chunk <= 0:
        raise ValueError(
            f"batch={batch}, seq_len={seq_len}, shards={shards} and loss_chunk={loss_chunk} must be positive"
        )
    param_bytes = parse_dtype(param_dtype).itemsize
    act_bytes = parse_dtype(activation_dtype or param_dtype).itemsize
    n_params = count_parameters(config)
    tokens = batch * seq_len
    per_layer = [activation_values_per_token(config, spec) for spec in config.layers]
    if gradient_checkpointing:  # each layer keeps its input; one layer is recomputed at a time
        layer_values, kept_layers = config.d_model * len(per_layer) + max(per_layer), 1
    else:
        layer_values, kept_layers = sum(per_layer), len(per_layer)
    # Under autocast the RMSNorms upcast to float32 and keep those copies too (measured with
    # saved_tensors_hooks: about 5·d float32 values per layer and token beside the compute-dtype ones).
    upcast_bytes = MIXED_NORM_FP32_VALUES * config.d_model * 4 * kept_layers if act_bytes < 4 else 0
    head_weights = config.vocab_size * config.d_model
    # the chunk's float32 logit blocks, the float32 head-gradient accumulator and, kept for the backward,
    # the head-weight and hidden-state gradients
    blocks = LOGIT_BLOCKS if teacher is not None else CE_LOGIT_BLOCKS
    loss = blocks * min(tokens, loss_chunk) * config.vocab_size * 4
    loss += head_weights * (4 + act_bytes) + tokens * config.d_model * act_bytes
    estimate = MemoryEstimate(
        parameters=n_params * param_bytes // shards,
        gradients=n_params * param_bytes // shards,
        optimizer=n_params * param_bytes * OPTIMIZER_STATES[optimizer] // shards,
        activations=tokens * (layer_values * act_bytes + upcast_bytes + 4 * config.d_model * act_bytes),
        loss=loss,
    )
    if gradient_buckets:
        estimate.gradients += n_params * param_bytes
    if shards > 1:
        layer = max(count_parameters(config, layer_index=i) for i in range(config.n_layers))
        estimate.gathered = (root_parameters(config) + 2 * layer) * act_bytes + layer * param_bytes
    if teacher is not None:
        estimate.teacher = count_parameters(teacher) * act_bytes // shards
        estimate.teacher += tokens * teacher.d_model * act_bytes  # its final hidden states
        if shards > 1:  # its LM head, gathered for the loss
            estimate.teacher += teacher.vocab_size * teacher.d_model * act_bytes
    return estimate


def root_parameters(config: ModelConfig) -> int:
    """Parameters outside the decoder layers: embedding, final norm and (untied) LM head."""
    return config.vocab_size * config.d_model * (1 if config.tie_embeddings else 2) + config.d_model


def estimate_inference_memory(
    config: ModelConfig, batch: int, max_len: int, dtype: torch.dtype | str = "bf16"
) -> MemoryEstimate:
    """Weights plus a KV cache for ``batch`` sequences of ``max_len`` tokens (activations of one step)."""
    item = parse_dtype(dtype).itemsize
    step = batch * (4 * config.d_model + config.vocab_size) * item
    return MemoryEstimate(
        parameters=count_parameters(config) * item,
        gradients=0,
        optimizer=0,
        activations=step,
        kv_cache=kv_cache_bytes(config, max_len, dtype, batch),
    )
