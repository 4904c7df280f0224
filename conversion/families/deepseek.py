"""DeepSeek-V2 and DeepSeek-V3: multi-head latent attention with a dense SwiGLU MLP in every layer.

Semantics checked against transformers' ``modeling_deepseek_v2/v3`` (an absent key takes the config
class's default; tests compare with the pinned transformers):
- MoE layers are those with index >= ``first_k_dense_replace``; any → refused (dense MLP only).
- The latent and query norms use a fixed eps of 1e-6 (kvforge's ``MLA_NORM_EPS``), not ``rms_norm_eps``.
- ``attention_bias`` biases ``q_a_proj``, ``kv_a_proj_with_mqa`` and ``o_proj``.
- RoPE rows: V2 always rotates interleaved pairs (complex multiply); V3 does so when
  ``rope_interleave`` is true (its default) and rotates halves when false. kvforge rotates halves,
  so import reorders the rotary rows of ``q_proj``/``q_b_proj`` and ``kv_a_proj_with_mqa``
  (even dims first, then odd) - the attention scores are unchanged because q and k move together.
- Export writes the interleaved layout with ``rope_interleave: true``: vLLM and SGLang build
  DeepSeek MLA with ``is_neox_style=False`` whatever ``rope_interleave`` says, so that is the only
  layout stock transformers *and* the servers compute identically.
- ``num_key_value_heads`` must equal ``num_attention_heads`` (keys are expanded per head).
- kvforge's ``mla_latent_norm_eps`` (kv_a_layernorm's eps) may exceed 1e-6 (to_mla's linear regime, scaled
  for training): export multiplies the latent rows of ``kv_a_proj_with_mqa`` by ``√(1e-6 / eps)``, since
  ``RMSNorm(s·c; eps·s²) = RMSNorm(c; eps)``, and records eps under ``kvforge_mla_latent_norm_eps`` (stock
  readers ignore the key); import undoes both, so a converted directory trains as the in-memory
  conversion does. Without the key (any other DeepSeek checkpoint) eps is 1e-6 and nothing changes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvforge.arch import LayerSpec, ModelConfig

from .base import RowPermutation, StateDict, StockFamily
from .layers import kvforge_only_problem
from .llama import decoder_keys
from .schema import TRANSFORMERS, ConfigReader, Fixed, SharedBias

MLA_SIZES = ("kv_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim")
# kvforge's MLA latent/query norm eps (arch.attention_mla.MLA_NORM_EPS), as in transformers
LATENT_NORM_EPS = 1e-6
EXPORT_ROPE_INTERLEAVED = True
# config.json key recording kvforge's raised latent-norm eps, so kvforge reads its trainable scale back
KVFORGE_LATENT_EPS_KEY = "kvforge_mla_latent_norm_eps"


def _rope_rows(config: ModelConfig, name: str, n_rows: int) -> torch.Tensor:
    """Row order that turns interleaved rotary rows (x0 x1 x2 x3 …) into halves (x0 x2 … | x1 x3 …)."""
    rope = config.qk_rope_head_dim
    halves = torch.cat((torch.arange(0, rope, 2), torch.arange(1, rope, 2)))
    if "kv_a_proj_with_mqa" in name:  # [latent | shared rotary key]
        order = torch.cat((torch.arange(config.kv_lora_rank), config.kv_lora_rank + halves))
    else:  # q_proj / q_b_proj: per head [no-rope part | rotary part]
        head = config.qk_nope_head_dim + rope
        within = torch.cat((torch.arange(config.qk_nope_head_dim), config.qk_nope_head_dim + halves))
        order = (torch.arange(config.n_heads)[:, None] * head + within).reshape(-1)
    if order.numel() != n_rows:
        raise ValueError(f"{name}: {n_rows} rows, but the MLA sizes in the config imply {order.numel()}")
    return order


INTERLEAVED_ROPE = RowPermutation(
    (
        "self_attn.q_proj.weight",
        "self_attn.q_b_proj.weight",
        "kv_a_proj_with_mqa.weight",
        "kv_a_proj_with_mqa.bias",
    ),
    _rope_rows,
)


@dataclass(frozen=True)
class LatentNormEps:
    """kvforge's ``mla_latent_norm_eps`` ↔ DeepSeek's fixed 1e-6: the latent rows of ``kv_a_proj_with_mqa``
    (weight and bias) scale by ``√(1e-6 / eps)`` on export (exact when that is a power of two, as to_mla
    chooses it) and by its inverse on import (eps from ``kvforge_mla_latent_norm_eps``; 1e-6 without it)."""

    suffixes: tuple[str, ...] = ("kv_a_proj_with_mqa.weight", "kv_a_proj_with_mqa.bias")

    def _apply(self, tensors: StateDict, config: ModelConfig, power: float) -> None:
        factor = (LATENT_NORM_EPS / config.mla_latent_norm_eps) ** (power / 2)
        if factor == 1.0:
            return
        for name in [n for n in tensors if n.endswith(self.suffixes)]:
            tensor = tensors[name]
            scale = torch.ones(tensor.shape[0], dtype=torch.float64, device=tensor.device)
            scale[: config.kv_lora_rank] = factor
            shape = (-1,) + (1,) * (tensor.dim() - 1)
            tensors[name] = (tensor.double() * scale.view(shape)).to(tensor.dtype)

    def to_kvforge(self, tensors: StateDict, config: ModelConfig) -> None:
        self._apply(tensors, config, -1.0)

    def to_hf(self, tensors: StateDict, config: ModelConfig) -> None:
        self._apply(tensors, config, 1.0)


LATENT_NORM = LatentNormEps()


@dataclass(frozen=True)
class MLALayers:
    """MLA sizes → one ``LayerSpec("mla")`` per layer with DeepSeek's shared rotary key and latent norm."""

    fields: tuple[str, ...] = (
        "layers",
        "pattern",
        "n_kv_heads",
        "head_dim",
        "qk_norm",
        "q_lora_rank",
        "mla_rope_heads",
        "mla_latent_norm",
        "mla_rope_theta",
        "mla_q_bias",
        "mla_latent_norm_eps",
        *MLA_SIZES,
    )

    def read(self, reader: ConfigReader, fields: dict) -> None:
        for name in MLA_SIZES:
            fields[name] = reader.get(name, int)
        fields["q_lora_rank"] = reader.get("q_lora_rank", int, nullable=True)
        n_kv = reader.get("num_key_value_heads", int, TRANSFORMERS, nullable=True)
        if n_kv not in (None, fields["n_heads"]):
            raise reader.error(
                f"num_key_value_heads={n_kv} must equal num_attention_heads={fields['n_heads']}: "
                "DeepSeek attention expands the latent into one key/value per head"
            )
        # head_dim is the MHA-equivalent head width (the baseline of KV-savings ratios); MLA layers
        # themselves use the sizes above. transformers overwrites config.head_dim with the rope dim.
        fields.update(n_kv_heads=fields["n_heads"], head_dim=fields["v_head_dim"])
        fields["layers"] = [LayerSpec("mla") for _ in range(fields["n_layers"])]
        fields["mla_latent_norm_eps"] = reader.get(KVFORGE_LATENT_EPS_KEY, float, LATENT_NORM_EPS)

    def write(self, config: ModelConfig, hf: dict) -> None:
        hf.update({name: getattr(config, name) for name in (*MLA_SIZES, "q_lora_rank")})
        hf["num_key_value_heads"] = config.n_heads
        hf["head_dim"] = config.qk_rope_head_dim
        if config.mla_latent_norm_eps != LATENT_NORM_EPS:  # stock readers ignore it (LatentNormEps)
            hf[KVFORGE_LATENT_EPS_KEY] = config.mla_latent_norm_eps

    def why_not(self, config: ModelConfig) -> str | None:
        for index, spec in enumerate(config.layers):
            if spec.attention != "mla":
                return f"layer {index} is {spec.attention!r}; DeepSeek layers are all MLA"
            if spec.kv_from is not None:
                return f"layer {index} reads the latent of layer {spec.kv_from} (cross-layer sharing)"
            problem = kvforge_only_problem(index, spec)
            if problem:
                return problem
            if spec.window is not None:
                return f"layer {index} has a sliding window; DeepSeek attends globally"
        if config.mla_rope_heads != 1:
            return f"mla_rope_heads={config.mla_rope_heads}; DeepSeek has one rotary key shared by all heads"
        if not config.mla_latent_norm:
            return "mla_latent_norm=False; DeepSeek always normalises the latent (kv_a_layernorm)"
        if config.mla_q_bias:
            return "mla_q_bias=True; DeepSeek's q_proj has no bias (attention_bias biases q_a_proj, kv_a_proj, o_proj)"
        if config.mla_rope_theta not in (None, config.rope_theta):
            return f"mla_rope_theta={config.mla_rope_theta} differs from rope_theta={config.rope_theta}"
        return None


@dataclass(frozen=True)
class DenseMLPOnly:
    mtp_key: bool  # DeepSeek-V3 also names its multi-token-prediction layers
    fields: tuple[str, ...] = ()

    def read(self, reader: ConfigReader, fields: dict) -> None:
        first = reader.get("first_k_dense_replace", int, TRANSFORMERS, nullable=True)
        n_layers = fields["n_layers"]
        if first is None or first < n_layers:
            raise reader.error(
                f"mixture-of-experts checkpoint (first_k_dense_replace={first}, num_hidden_layers={n_layers}: "
                "the layers from first_k_dense_replace on are MoE); kvforge imports DeepSeek models with a "
                "dense MLP in every layer only (first_k_dense_replace >= num_hidden_layers)"
            )

    def write(self, config: ModelConfig, hf: dict) -> None:
        hf["first_k_dense_replace"] = config.n_layers
        hf["moe_layer_freq"] = 1
        if self.mtp_key:
            hf["num_nextn_predict_layers"] = 0

    def why_not(self, config: ModelConfig) -> str | None:
        return None


@dataclass(frozen=True)
class RopeInterleaveKey:
    """DeepSeek-V3's ``rope_interleave`` (null reads as false, as in transformers)."""

    fields: tuple[str, ...] = ()

    def read(self, reader: ConfigReader, fields: dict) -> None:
        reader.get("rope_interleave", bool, TRANSFORMERS, nullable=True)

    def write(self, config: ModelConfig, hf: dict) -> None:
        hf["rope_interleave"] = EXPORT_ROPE_INTERLEAVED

    def why_not(self, config: ModelConfig) -> str | None:
        return None


def _notes(config: ModelConfig) -> list[str]:
    notes = []
    if config.norm_eps != LATENT_NORM_EPS:
        notes.append(
            f"vLLM/SGLang normalise the MLA latent with rms_norm_eps={config.norm_eps}, transformers and kvforge "
            f"with {LATENT_NORM_EPS}: served logits differ slightly from transformers' unless rms_norm_eps is 1e-6"
        )
    if config.attention_bias:
        notes.append("vLLM/SGLang build DeepSeek attention without biases and will not load the bias tensors")
    return notes


def _deepseek(model_type: str, architecture: str, *, v3: bool) -> StockFamily:
    table = [*decoder_keys(), MLALayers(), SharedBias(), DenseMLPOnly(mtp_key=v3)]
    if v3:
        table.append(RopeInterleaveKey())
    else:
        table.append(Fixed("mlp_bias", False))

    def layouts(hf: dict) -> tuple:
        interleaved = bool(hf.get("rope_interleave", True)) if v3 else True
        return (INTERLEAVED_ROPE, LATENT_NORM) if interleaved else (LATENT_NORM,)

    return StockFamily(model_type, architecture, tuple(table), layouts=layouts, notes=_notes)


DEEPSEEK_V2 = _deepseek("deepseek_v2", "DeepseekV2ForCausalLM", v3=False)
DEEPSEEK_V3 = _deepseek("deepseek_v3", "DeepseekV3ForCausalLM", v3=True)
