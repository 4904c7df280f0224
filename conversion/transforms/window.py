"""Sliding windows on chosen layers; the weights do not change."""

from __future__ import annotations

import dataclasses

import torch

from kvforge.arch import ModelConfig

from .common import Sink, StateDict, is_count, map_layers


def window_config(config: ModelConfig, *, windows: int | list[int | None]) -> ModelConfig:
    """``windows``: one window for every layer, or a per-layer pattern tiled over the layers
    (``[1024, 1024, 1024, None]`` = 3 local : 1 global; ``None`` = global)."""
    pattern = list(windows) if isinstance(windows, (list, tuple)) else [windows]
    if not pattern or config.n_layers % len(pattern):
        raise ValueError(
            f"to_window: windows pattern of length {len(pattern)} must divide n_layers={config.n_layers}"
        )
    for window in pattern:
        if window is not None and (not is_count(window) or not 0 < window < config.max_seq_len):
            raise ValueError(
                f"to_window: window={window!r} must be an integer in 1..{config.max_seq_len - 1} (a window of "
                f"max_seq_len={config.max_seq_len} or more is global attention: write None)"
            )
    tiled = pattern * (config.n_layers // len(pattern))
    for index, (spec, window) in enumerate(zip(config.layers, tiled)):
        source = config.layers[spec.kv_from] if spec.kv_from is not None else None
        if source is not None and tiled[spec.kv_from] != window:
            raise ValueError(
                f"to_window: layer {index} reads layer {spec.kv_from}'s K/V, so both need the same window "
                f"(got {window} and {tiled[spec.kv_from]})"
            )
    layers = [dataclasses.replace(spec, window=w) for spec, w in zip(config.layers, tiled)]
    return dataclasses.replace(config, layers=layers, pattern=None)


def to_window(
    config: ModelConfig,
    state_dict: StateDict,
    calibration: torch.Tensor | None = None,
    *,
    windows: int | list[int | None],
    device: str | torch.device = "cpu",
    sink: Sink | None = None,
) -> tuple[ModelConfig, StateDict]:
    """:func:`window_config` on the config; the weights are returned as they are (a new dict, or
    copied to ``sink`` layer by layer). ``device`` is accepted for a uniform call and unused."""
    new_config = window_config(config, windows=windows)
    return new_config, map_layers(
        new_config, state_dict, [[index] for index in range(config.n_layers)], dict, sink
    )
