"""What llama.cpp needs per architecture: the metadata it reads and the tensor layout it computes with.

One record per llama.cpp architecture kvforge writes, keyed by the Hugging Face family an export
goes to (``plan_export``): the GGUF export starts from the HF names and layout of that family, so
everything the family tables already decide (rotary row order of DeepSeek, Gemma's norm names,
zero biases) is done once. What each record adds, read from llama.cpp's ``src/models/*.cpp`` and
its ``convert_hf_to_gguf.py`` (the converter that defines what a llama.cpp file holds):

| arch      | from            | tensors                                            | refuses                       |
|-----------|-----------------|----------------------------------------------------|-------------------------------|
| llama     | llama, mistral  | Q/K rows into rotary pairs (rope type NORM)        | windows (llama.cpp ignores them) |
| qwen2     | qwen2           | as HF (NEOX rope)                                  | windows                       |
| qwen3     | qwen3           | as HF, q/k norms                                   | windows                       |
| gemma2    | gemma2          | every norm stored as 1 + w                         | untied head, scalar ≠ head_dim |
| gemma3    | gemma3_text     | every norm (q/k too) stored as 1 + w               | attention soft-cap, scalar ≠ head_dim |
| deepseek2 | deepseek_v2/v3  | kv_b_proj split into k_b (transposed) and v_b (MLA) | biases, rope scaling          |
| granite_swa | llama, mistral, qwen2 with windows or sinks | Llama's, plus a sink logit per head | several window sizes |

Windows are written per layer (``sliding_window_pattern``, one flag per layer), so any pattern of one
window size is exact. llama.cpp's llama/qwen2/qwen3 graphs attend globally whatever the file says, so
a Llama-recipe model with windows (or attention sinks) goes to ``granite_swa`` instead: Llama's graph
with per-layer windows and sinks (Granite's embedding/residual/logit scales are 1 or unset). Qwen3's
q/k norms have no such twin: windowed Qwen3 is refused.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from kvforge.arch import ModelConfig

Tensors = list[tuple[str, torch.Tensor]]  # HF name -> tensor, in writing order


@dataclass(frozen=True)
class GGUFArchitecture:
    name: str
    hparams: Callable[[ModelConfig], dict[str, Any]]  # "<arch>." keys (without the prefix) -> value
    tensors: Callable[[ModelConfig, str, torch.Tensor], Tensors] = lambda config, name, tensor: [
        (name, tensor)
    ]
    why_not: Callable[[ModelConfig], str | None] = lambda config: None
    extra_tensors: Callable[[ModelConfig], Tensors] = lambda config: []  # global ones (rope_freqs)
    rope_scaling: tuple[str, ...] = ()  # rope_scaling types llama.cpp computes for this arch
    names_from: str | None = None  # the gguf architecture whose tensor names it uses (None: its own)


def _common(config: ModelConfig) -> dict[str, Any]:
    return {
        "context_length": config.max_seq_len,
        "embedding_length": config.d_model,
        "block_count": config.n_layers,
        "feed_forward_length": config.ffn_dim,
        "attention.head_count": config.n_heads,
        "attention.head_count_kv": config.n_kv_heads,
        "attention.key_length": config.head_dim,
        "attention.value_length": config.head_dim,
        "attention.layer_norm_rms_epsilon": config.norm_eps,
        "rope.dimension_count": config.head_dim,
        "rope.freq_base": config.rope_theta,
        "vocab_size": config.vocab_size,
        **_linear_scaling(config),
    }


def _linear_scaling(config: ModelConfig) -> dict[str, Any]:
    scaling = config.rope_scaling
    if scaling is None or scaling.type != "linear":
        return {}
    return {"rope.scaling.type": "linear", "rope.scaling.factor": scaling.factor}


def _windows(config: ModelConfig) -> dict[int, int]:
    return {index: spec.window for index, spec in enumerate(config.layers) if spec.window is not None}


def _global_only(arch: str) -> Callable[[ModelConfig], str | None]:
    def why_not(config: ModelConfig) -> str | None:
        sinks = [index for index, spec in enumerate(config.layers) if spec.sinks]
        if sinks:
            return f"attention sinks on layers {sinks}: llama.cpp's {arch} architecture has none"
        windows = _windows(config)
        if windows:
            return (
                f"sliding windows on layers {sorted(windows)} (window {sorted(set(windows.values()))}): llama.cpp's "
                f"{arch} architecture attends globally, so the file would compute another model"
            )
        return None

    return why_not


def _llama3_rope_freqs(config: ModelConfig) -> Tensors:
    """Llama-3 RoPE: llama.cpp reads the per-frequency factors from a ``rope_freqs`` tensor
    (convert_hf_to_gguf.py's LlamaModel.generate_extra_tensors)."""
    scaling = config.rope_scaling
    if scaling is None or scaling.type != "llama3":
        return []
    freqs = 1.0 / (
        config.rope_theta ** (torch.arange(0, config.head_dim, 2, dtype=torch.float32) / config.head_dim)
    )
    old = scaling.original_max_seq_len
    low_wavelen, high_wavelen = old / scaling.low_freq_factor, old / scaling.high_freq_factor
    factors = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            factors.append(1.0)
        elif wavelen > low_wavelen:
            factors.append(scaling.factor)
        else:
            smooth = (old / wavelen - scaling.low_freq_factor) / (
                scaling.high_freq_factor - scaling.low_freq_factor
            )
            factors.append(1 / ((1 - smooth) / scaling.factor + smooth))
    return [("rope_freqs.weight", torch.tensor(factors, dtype=torch.float32))]


def _rotary_pairs(config: ModelConfig, name: str, tensor: torch.Tensor) -> Tensors:
    """llama.cpp's llama graph rotates adjacent pairs; HF Llama rotates halves (convert_hf_to_gguf permute)."""
    heads = {"self_attn.q_proj": config.n_heads, "self_attn.k_proj": config.n_kv_heads}
    for module, n_heads in heads.items():
        if f".{module}." in name:
            rows = tensor.shape[0]
            tensor = tensor.reshape(n_heads, 2, rows // n_heads // 2, *tensor.shape[1:]).swapaxes(1, 2)
            tensor = tensor.reshape(rows, *tensor.shape[3:])
    return [(name, tensor)]


def _unit_offset_norms(config: ModelConfig, name: str, tensor: torch.Tensor) -> Tensors:
    """Gemma's RMSNorms scale by 1 + w; llama.cpp multiplies by the stored weight, so it stores 1 + w."""
    if name.endswith("norm.weight"):
        tensor = tensor.float() + 1
    return [(name, tensor)]


def _gemma_why_not(config: ModelConfig, *, soft_cap_allowed: bool, tied_only: bool) -> str | None:
    if config.query_pre_attn_scalar not in (None, config.head_dim):
        return (
            f"query_pre_attn_scalar={config.query_pre_attn_scalar} differs from head_dim={config.head_dim}: "
            "llama.cpp's Gemma graphs scale scores by head_dim^-1/2 (the 27B's n_embd/n_head only by layer count)"
        )
    if not soft_cap_allowed and config.attn_logit_softcap is not None:
        return "attention soft-capping: llama.cpp's gemma3 graph has none"
    if tied_only and not config.tie_embeddings:
        return "an untied output head: llama.cpp's gemma2 graph always reads the embeddings as the head"
    if len(set(_windows(config).values())) > 1:
        return f"several window sizes {sorted(set(_windows(config).values()))}: llama.cpp has one per model"
    return None


def _gemma_hparams(config: ModelConfig) -> dict[str, Any]:
    windows = _windows(config)
    hparams = {**_common(config)}
    if windows:
        hparams["attention.sliding_window"] = next(iter(windows.values()))
        hparams["attention.sliding_window_pattern"] = [index in windows for index in range(config.n_layers)]
    if config.attn_logit_softcap is not None:
        hparams["attn_logit_softcapping"] = config.attn_logit_softcap
    if config.final_logit_softcap is not None:
        hparams["final_logit_softcapping"] = config.final_logit_softcap
    if config.window_rope_theta is not None:
        hparams["rope.freq_base_swa"] = config.window_rope_theta
    return hparams


def _deepseek_hparams(config: ModelConfig) -> dict[str, Any]:
    # MLA runs in llama.cpp as MQA over the latent: one K/V "head" of kv_lora_rank (+ the rotary key)
    rope, latent = config.qk_rope_head_dim, config.kv_lora_rank
    return {
        **_common(config),
        "attention.head_count_kv": 1,
        "attention.key_length": latent + rope,
        "attention.value_length": latent,
        "attention.key_length_mla": config.qk_nope_head_dim + rope,
        "attention.value_length_mla": config.v_head_dim,
        "attention.kv_lora_rank": latent,
        "attention.q_lora_rank": config.q_lora_rank or 0,  # llama.cpp requires it; 0 = a plain q_proj
        "rope.dimension_count": rope,
        "leading_dense_block_count": config.n_layers,  # every MLP dense
        "expert_feed_forward_length": config.ffn_dim,  # required even without experts
        "expert_shared_count": 0,
    }


def _split_kv_b(config: ModelConfig, name: str, tensor: torch.Tensor) -> Tensors:
    """Absorbed MLA in llama.cpp: kv_b_proj splits into k_b (per head, transposed) and v_b."""
    if not name.endswith("kv_b_proj.weight"):
        return [(name, tensor)]
    nope, v_dim = config.qk_nope_head_dim, config.v_head_dim
    kv_b = tensor.reshape(config.n_heads, nope + v_dim, tensor.shape[-1])
    k_b, v_b = kv_b.split([nope, v_dim], dim=1)
    return [
        (name.replace("kv_b_proj", "k_b_proj"), k_b.transpose(1, 2).contiguous()),
        (name.replace("kv_b_proj", "v_b_proj"), v_b.contiguous()),
    ]


def _deepseek_why_not(config: ModelConfig) -> str | None:
    if config.attention_bias or config.o_proj_bias:
        return "attention biases: llama.cpp's deepseek2 graph has none"
    return None


def _swa_hparams(config: ModelConfig) -> dict[str, Any]:
    windows = _windows(config)
    return {
        **_common(config),
        "logit_scale": 1.0,  # granite_swa divides the logits by it; the other Granite scales stay unset
        "attention.sliding_window": next(iter(windows.values()), config.max_seq_len),
        "attention.sliding_window_pattern": [index in windows for index in range(config.n_layers)],
    }


NO_SINK = -1e30  # granite_swa requires a sink logit per head; exp(-1e30 - max) is exactly 0 in f32


def _swa_tensors(config: ModelConfig, name: str, tensor: torch.Tensor) -> Tensors:
    """Llama's tensors (rotary pairs) plus the per-head sink logits granite_swa always reads."""
    if name.endswith(".self_attn.sinks"):
        return [(f"blk.{name.split('.')[2]}.attn_sinks.weight", tensor)]
    converted = _rotary_pairs(config, name, tensor)
    layer = int(name.split(".")[2]) if name.startswith("model.layers.") else None
    if name.endswith(".self_attn.q_proj.weight") and not config.layers[layer].sinks:
        sinks = torch.full((config.n_heads,), NO_SINK, dtype=torch.float32, device=tensor.device)
        converted.append((f"blk.{layer}.attn_sinks.weight", sinks))
    return converted


def _swa_why_not(config: ModelConfig) -> str | None:
    if len(set(_windows(config).values())) > 1:
        return f"several window sizes {sorted(set(_windows(config).values()))}: llama.cpp has one per model"
    return None


LLAMA = GGUFArchitecture(
    "llama",
    _common,
    _rotary_pairs,
    _global_only("llama"),
    _llama3_rope_freqs,
    ("linear", "llama3"),
)
QWEN2 = GGUFArchitecture("qwen2", _common, why_not=_global_only("qwen2"), rope_scaling=("linear",))
QWEN3 = GGUFArchitecture("qwen3", _common, why_not=_global_only("qwen3"), rope_scaling=("linear",))
GEMMA2 = GGUFArchitecture(
    "gemma2",
    _gemma_hparams,
    _unit_offset_norms,
    lambda config: _gemma_why_not(config, soft_cap_allowed=True, tied_only=True),
)
GEMMA3 = GGUFArchitecture(
    "gemma3",
    _gemma_hparams,
    _unit_offset_norms,
    lambda config: _gemma_why_not(config, soft_cap_allowed=False, tied_only=False),
    rope_scaling=("linear",),
)
DEEPSEEK2 = GGUFArchitecture("deepseek2", _deepseek_hparams, _split_kv_b, _deepseek_why_not)

# Llama's recipe with per-layer sliding windows (one size) and attention sinks: llama.cpp's granite_swa
# graph is Llama's (RMSNorm, SwiGLU, rotary pairs) plus both, with Granite's scales left at 1.
GRANITE_SWA = GGUFArchitecture(
    "granite_swa",
    _swa_hparams,
    _swa_tensors,
    _swa_why_not,
    _llama3_rope_freqs,
    ("linear", "llama3"),
    names_from="llama",
)

# HF family an export plans (kvforge.conversion.families) -> the llama.cpp architecture that runs it.
BY_FAMILY: dict[str, GGUFArchitecture] = {
    "llama": LLAMA,
    "mistral": LLAMA,
    "qwen2": QWEN2,
    "qwen3": QWEN3,
    "gemma2": GEMMA2,
    "gemma3_text": GEMMA3,
    "deepseek_v2": DEEPSEEK2,
    "deepseek_v3": DEEPSEEK2,
}
