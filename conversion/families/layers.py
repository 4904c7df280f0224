"""Per-layer attention of the GQA families: K/V heads and sliding windows.

Three ways a stock config says which layers slide, each read and written by one codec:
- :class:`NoWindows` (Llama): every layer is global.
- :class:`UniformWindow` (Mistral): ``sliding_window`` applies to every layer (null = none).
- :class:`LayerTypes` (Qwen2/Qwen3): ``layer_types[i] == "sliding_attention"`` slides, but only
  when ``use_sliding_window`` is true (otherwise transformers drops ``sliding_window``); without
  ``layer_types`` the layers from ``max_window_layers`` on slide (``Qwen2Config``).
Windows mean the same in kvforge and transformers: a query at p sees keys in (p - W, p].
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kvforge.arch import LayerSpec, ModelConfig

from .schema import TRANSFORMERS, ConfigReader

FULL, SLIDING = "full_attention", "sliding_attention"
# ModelConfig fields no GQA-only model uses: a GQA family has nothing to say about them.
MLA_FIELDS = (
    "kv_lora_rank",
    "q_lora_rank",
    "qk_rope_head_dim",
    "qk_nope_head_dim",
    "v_head_dim",
    "mla_rope_heads",
    "mla_latent_norm",
    "mla_rope_theta",
    "mla_q_bias",
    "mla_latent_norm_eps",
)


def kvforge_only_problem(index: int, spec: LayerSpec) -> str | None:
    """Layer options no stock family of kvforge's tables expresses (gpt-oss has sinks, but is MoE)."""
    if spec.kv_from is not None:
        return f"layer {index} reads the K/V of layer {spec.kv_from} (cross-layer sharing)"
    if spec.sinks:
        return f"layer {index} has attention sinks (stock gpt-oss has them, but is mixture-of-experts)"
    if spec.chunk is not None:
        return f"layer {index} attends within chunks of {spec.chunk} tokens (chunked local attention)"
    if not spec.rope:
        return f"layer {index} is a NoPE layer (no rotary embedding)"
    return None


def gqa_problem(config: ModelConfig) -> str | None:
    """Why a stock GQA family cannot hold ``config`` at all (before looking at windows)."""
    for index, spec in enumerate(config.layers):
        if spec.attention != "gqa":
            return f"layer {index} is {spec.attention!r}; this family has GQA/MHA/MQA layers only"
        problem = kvforge_only_problem(index, spec)
        if problem:
            return problem
    heads = {spec.n_kv_heads for spec in config.layers}
    if len(heads) > 1:
        return f"layers have different n_kv_heads {sorted(heads)}; this family has one num_key_value_heads"
    return None


def single_window(config: ModelConfig) -> tuple[int | None, str | None]:
    """The one window size used by the windowed layers (None if none), or why there is not one."""
    windows = sorted({spec.window for spec in config.layers if spec.window is not None})
    if len(windows) > 1:
        return None, f"layers use different windows {windows}; this family has one sliding_window"
    return (windows[0] if windows else None), None


@dataclass(frozen=True)
class NoWindows:
    def read(self, reader: ConfigReader, n_layers: int) -> list[int | None]:
        return [None] * n_layers

    def write(self, config: ModelConfig, hf: dict[str, Any]) -> None:
        pass

    def why_not(self, config: ModelConfig) -> str | None:
        windowed = [i for i, spec in enumerate(config.layers) if spec.window is not None]
        if windowed:
            return f"layers {windowed} use sliding windows; this family has global attention only"
        return None


@dataclass(frozen=True)
class UniformWindow:
    def read(self, reader: ConfigReader, n_layers: int) -> list[int | None]:
        return [reader.get("sliding_window", int, TRANSFORMERS, nullable=True)] * n_layers

    def write(self, config: ModelConfig, hf: dict[str, Any]) -> None:
        hf["sliding_window"] = config.layers[0].window

    def why_not(self, config: ModelConfig) -> str | None:
        windows = {spec.window for spec in config.layers}
        if len(windows) > 1:
            return "some layers slide and others do not (or windows differ); this family has one sliding_window for all"
        return None


@dataclass(frozen=True)
class LayerTypes:
    def read(self, reader: ConfigReader, n_layers: int) -> list[int | None]:
        use = reader.get("use_sliding_window", bool, TRANSFORMERS)
        window = reader.get("sliding_window", int, TRANSFORMERS, nullable=True) if use else None
        layer_types = reader.get("layer_types", list, None, nullable=True)
        if layer_types is None:
            first = reader.get("max_window_layers", int, TRANSFORMERS)
            layer_types = [SLIDING if window is not None and i >= first else FULL for i in range(n_layers)]
        if len(layer_types) != n_layers or any(t not in (FULL, SLIDING) for t in layer_types):
            raise reader.error(
                f"layer_types={layer_types!r}: expected {n_layers} entries (num_hidden_layers), "
                f"each {FULL!r} or {SLIDING!r}"
            )
        if window is None and SLIDING in layer_types:
            raise reader.error(
                "layer_types has sliding_attention layers but use_sliding_window is false or sliding_window "
                "is null, so no window size is defined (transformers cannot run this config either)"
            )
        return [window if kind == SLIDING else None for kind in layer_types]

    def write(self, config: ModelConfig, hf: dict[str, Any]) -> None:
        window, _ = single_window(config)
        sliding = [spec.window is not None for spec in config.layers]
        hf["use_sliding_window"] = window is not None
        hf["sliding_window"] = window
        # transformers < 4.5x and older servers only read max_window_layers: exact when the sliding
        # layers are the last ones; layer_types is exact for any pattern.
        hf["max_window_layers"] = sliding.index(True) if window is not None else config.n_layers
        hf["layer_types"] = [SLIDING if s else FULL for s in sliding]

    def why_not(self, config: ModelConfig) -> str | None:
        return single_window(config)[1]


@dataclass(frozen=True)
class GQALayers:
    """``num_key_value_heads`` plus the family's window codec → one ``LayerSpec("gqa")`` per layer."""

    windows: NoWindows | UniformWindow | LayerTypes
    fields: tuple[str, ...] = ("n_kv_heads", "layers", "pattern", *MLA_FIELDS)

    def read(self, reader: ConfigReader, fields: dict[str, Any]) -> None:
        n_kv = reader.get("num_key_value_heads", int, TRANSFORMERS, nullable=True)
        n_kv = fields["n_heads"] if n_kv is None else n_kv
        fields["n_kv_heads"] = n_kv
        fields["layers"] = [
            LayerSpec("gqa", n_kv, window) for window in self.windows.read(reader, fields["n_layers"])
        ]

    def write(self, config: ModelConfig, hf: dict[str, Any]) -> None:
        hf["num_key_value_heads"] = config.layers[0].n_kv_heads
        self.windows.write(config, hf)

    def why_not(self, config: ModelConfig) -> str | None:
        return gqa_problem(config) or self.windows.why_not(config)
