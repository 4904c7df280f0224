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

from .config import LayerSpec, ModelConfig
from .kv_bytes import kv_cache_bytes, parse_dtype

GiB = 1024**3
# Bytes per parameter held by the optimizer (AdamW: exp_avg and exp_avg_sq in the parameter dtype).
OPTIMIZER_STATES = {"adamw": 2, "adam": 2, "sgd": 0, "sgd-momentum": 1}
# Rows of the fused head + cross-entropy computed at once (kvforge.kernels.linear_cross_entropy).
LOSS_CHUNK = 1024


def count_parameters(config: ModelConfig) -> int:
    """Exact parameter count of ``CausalLM(config)`` (tied embeddings counted once)."""
    d, total = config.d_model, 0
    total += config.vocab_size * d * (1 if config.tie_embeddings else 2)
    total += d  # final norm
    for spec in config.layers:
        total += 2 * d + 3 * d * config.ffn_dim  # two norms + SwiGLU
        params = {"gqa": _gqa_params, "mla": _mla_params, "gta": _gta_params, "gla": _mla_params}
        total += params[spec.attention](config, spec)
        total += config.n_heads if spec.sinks else 0
    return total


def _gqa_params(config: ModelConfig, spec: LayerSpec) -> int:
    d, q_dim, kv_dim = config.d_model, config.n_heads * config.head_dim, spec.n_kv_heads * config.head_dim
    bias = config.attention_bias
    total = d * q_dim + q_dim * d + (q_dim if bias else 0) + (d if config.o_proj_bias else 0)
    if spec.kv_from is None:
        total += 2 * (d * kv_dim + (kv_dim if bias else 0))
        total += config.head_dim if config.qk_norm else 0
    return total + (config.head_dim if config.qk_norm else 0)


def _gta_params(config: ModelConfig, spec: LayerSpec) -> int:
    d, q_dim = config.d_model, config.n_heads * config.head_dim
    bias = config.attention_bias
    total = d * q_dim + q_dim * d + (q_dim if bias else 0) + (d if config.o_proj_bias else 0)
    if spec.kv_from is None:  # kv_proj (tied states) and k_rope_proj (half a head)
        state = spec.n_kv_heads * config.head_dim + config.head_dim // 2
        total += d * state + (state if bias else 0)
    return total


def _mla_params(config: ModelConfig, spec: LayerSpec) -> int:
    d, heads, rank = config.d_model, config.n_heads, config.kv_lora_rank
    bias = config.attention_bias
    q_out = heads * config.qk_head_dim
    if config.q_lora_rank is None:
        total = d * q_out
    else:
        total = d * config.q_lora_rank + (config.q_lora_rank if bias else 0) + config.q_lora_rank
        total += config.q_lora_rank * q_out
    latent = rank + config.mla_rope_heads * config.qk_rope_head_dim
    if spec.kv_from is None:
        total += d * latent + (latent if bias else 0) + (rank if config.mla_latent_norm else 0)
    up_width = (
        rank // spec.n_latent_heads if spec.attention == "gla" else rank
    )  # a gla head reads its latent head
    total += up_width * heads * (config.qk_nope_head_dim + config.v_head_dim)
    return total + heads * config.v_head_dim * d + (d if config.o_proj_bias else 0)


def activation_values_per_token(config: ModelConfig, spec: LayerSpec) -> int:
    """Values autograd keeps per token for one layer's backward (fused attention, no scores)."""
    d, heads = config.d_model, config.n_heads
    common = 6 * d + 4 * config.ffn_dim
    if spec.attention in ("gqa", "gta"):  # gta: keys and values are materialised as in gqa
        q_dim, kv_dim = heads * config.head_dim, spec.n_kv_heads * config.head_dim
        own_kv = 2 * kv_dim if spec.kv_from is None else 0
        return common + 3 * q_dim + own_kv + heads
    qk, v = config.qk_head_dim, config.v_head_dim
    latent = config.kv_lora_rank + config.mla_rope_heads * config.qk_rope_head_dim
    own_latent = 2 * latent + config.kv_lora_rank if spec.kv_from is None else 0
    padded = max(qk, v)  # the sdpa backend pads the narrower of Q/K and V to a common width
    return common + own_latent + heads * (2 * qk + 2 * padded + v + 1)


@dataclass
class MemoryEstimate:
    """Bytes per device, by kind. ``total`` is what must fit."""

    parameters: int
    gradients: int
    optimizer: int
    activations: int
    kv_cache: int = 0

    @property
    def total(self) -> int:
        return self.parameters + self.gradients + self.optimizer + self.activations + self.kv_cache

    def rows(self) -> list[tuple[str, str]]:
        parts = [
            ("parameters", self.parameters),
            ("gradients", self.gradients),
            ("optimizer state", self.optimizer),
            ("activations", self.activations),
            ("KV cache", self.kv_cache),
            ("total", self.total),
        ]
        return [(name, f"{value / GiB:,.3f} GiB") for name, value in parts]

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
) -> MemoryEstimate:
    """Per-device training memory for micro-batches of ``batch × seq_len`` tokens.

    ``activation_dtype`` is the autocast dtype (``bf16`` for bf16-mixed; default: the parameter dtype);
    ``shards`` divides parameters, gradients and optimizer state (FSDP2 over that many devices).
    """
    if optimizer not in OPTIMIZER_STATES:
        raise ValueError(f"optimizer={optimizer!r}: allowed values are {sorted(OPTIMIZER_STATES)}")
    if batch <= 0 or seq_len <= 0 or shards <= 0:
        raise ValueError(f"batch={batch}, seq_len={seq_len} and shards={shards} must be positive")
    param_bytes = parse_dtype(param_dtype).itemsize
    act_bytes = parse_dtype(activation_dtype or param_dtype).itemsize
    n_params = count_parameters(config)
    tokens = batch * seq_len
    per_layer = [activation_values_per_token(config, spec) for spec in config.layers]
    if gradient_checkpointing:  # each layer keeps its input; one layer is recomputed at a time
        layer_values = config.d_model * len(per_layer) + max(per_layer)
    else:
        layer_values = sum(per_layer)
    # embeddings output + final norm, and the fused loss' chunk of logits and their gradient (fp32)
    head = tokens * 4 * config.d_model * act_bytes + 2 * min(tokens, LOSS_CHUNK) * config.vocab_size * 4
    return MemoryEstimate(
        parameters=n_params * param_bytes // shards,
        gradients=n_params * param_bytes // shards,
        optimizer=n_params * param_bytes * OPTIMIZER_STATES[optimizer] // shards,
        activations=tokens * layer_values * act_bytes + head,
    )


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
