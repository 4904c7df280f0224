"""Qwen2 and Qwen3: GQA with per-layer sliding windows (``layer_types``).

- Qwen2 always biases q/k/v and never o_proj (no ``attention_bias`` key). A bias-free model exports
  here with zero q/k/v biases (exactly the same function), which is how a Llama-shaped model with
  per-layer windows reaches a stock class.
- Qwen3 always has per-head RMSNorm on q and k (``q_norm``/``k_norm``, eps ``rms_norm_eps``, before
  RoPE); its ``attention_bias`` biases q/k/v and o_proj. ``head_dim`` defaults to 128, not
  hidden/heads.
An absent key takes the default of transformers' ``Qwen2Config``/``Qwen3Config``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvforge.arch import ModelConfig

from .base import StateDict, StockFamily
from .layers import GQALayers, LayerTypes
from .llama import decoder_keys
from .schema import TRANSFORMERS, Const, Key, SharedBias


@dataclass(frozen=True)
class ZeroQKVBiases:
    """Export of a bias-free model as Qwen2: write the q/k/v biases Qwen2 always has, as zeros."""

    def to_kvforge(self, tensors: StateDict, config: ModelConfig) -> None:
        pass  # a Qwen2 checkpoint always carries its biases

    def to_hf(self, tensors: StateDict, config: ModelConfig) -> None:
        if config.attention_bias:
            return
        for index, spec in enumerate(config.layers):
            prefix = f"model.layers.{index}.self_attn."
            if f"{prefix}q_proj.weight" not in tensors:
                continue  # written layer by layer: this part holds other layers
            reference = tensors[f"{prefix}q_proj.weight"]
            widths = {"q_proj": config.n_heads, "k_proj": spec.n_kv_heads, "v_proj": spec.n_kv_heads}
            for name, heads in widths.items():
                tensors[f"{prefix}{name}.bias"] = torch.zeros(
                    heads * config.head_dim, dtype=reference.dtype, device=reference.device
                )


@dataclass(frozen=True)
class Qwen2Biases:
    fields: tuple[str, ...] = ("attention_bias", "o_proj_bias")

    def read(self, reader, fields) -> None:
        fields["attention_bias"], fields["o_proj_bias"] = True, False

    def write(self, config, hf) -> None:
        pass

    def why_not(self, config: ModelConfig) -> str | None:
        if config.o_proj_bias:
            return "o_proj_bias=True but Qwen2 has no o_proj bias"
        return None


def _window_notes(config: ModelConfig) -> list[str]:
    sliding = [spec.window is not None for spec in config.layers]
    if any(sliding) and sliding != sorted(sliding):  # sliding layers are not a suffix
        return [
            "the sliding layers are not the last ones: layer_types says which slide (transformers reads it), "
            "but readers that only know max_window_layers (older transformers and servers) cannot express this"
        ]
    return []


def _qwen2_notes(config: ModelConfig) -> list[str]:
    notes = _window_notes(config)
    if not config.attention_bias:
        notes.append("Qwen2 always has q/k/v biases: written as zeros (the model computes exactly the same)")
    return notes


QWEN2 = StockFamily(
    "qwen2",
    "Qwen2ForCausalLM",
    (
        *decoder_keys(),
        # not a Qwen2Config field, but Qwen2Attention reads it when present
        Key("head_dim", "head_dim", int, None, nullable=True),
        GQALayers(LayerTypes()),
        Qwen2Biases(),
        Const("qk_norm", False, "Qwen2 has no q/k norm"),
    ),
    layouts=lambda hf: (ZeroQKVBiases(),),
    notes=_qwen2_notes,
)

QWEN3 = StockFamily(
    "qwen3",
    "Qwen3ForCausalLM",
    (
        *decoder_keys(),
        Key("head_dim", "head_dim", int, TRANSFORMERS),
        GQALayers(LayerTypes()),
        SharedBias(),
        Const("qk_norm", True, "Qwen3 always normalises q and k per head"),
    ),
    notes=_window_notes,
)
