"""Sliding windows on chosen layers; the weights do not change. ``sinks=True`` also gives every
windowed layer attention sinks, fitted from calibration data (:mod:`.sinks`)."""

from __future__ import annotations

import dataclasses

import torch

from kvforge.arch import ModelConfig

from .common import Sink, StateDict, is_count, map_layers, with_layers_rope_kept
from .record import Transform, option
from .sinks import SinkFitStage
from .stages import run_stage


def window_config(
    config: ModelConfig, *, windows: int | list[int | None], sinks: bool = False
) -> ModelConfig:
    """``windows``: one window for every layer, or a per-layer pattern tiled over the layers
    (``[1024, 1024, 1024, None]`` = 3 local : 1 global; ``None`` = global). ``sinks``: attention
    sinks on the windowed layers."""
    if not isinstance(sinks, bool):
        raise ValueError(f"to_window: sinks={sinks!r} must be true or false")
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
        if sinks and window is not None and spec.kv_from is not None:
            raise ValueError(
                f"to_window: sinks=True on layer {index}, which reads layer {spec.kv_from}'s K/V; sinks are "
                "fitted on layers that own their K/V (window the model before to_cla)"
            )
    if sinks and config.attn_logit_softcap is not None:
        raise ValueError(
            f"to_window: sinks=True on a model with attn_logit_softcap={config.attn_logit_softcap}: the sink fit "
            "models uncapped attention scores (allowed here: sinks=False)"
        )
    layers = [
        dataclasses.replace(spec, window=w, sinks=spec.sinks or (sinks and w is not None))
        for spec, w in zip(config.layers, tiled)
    ]
    return with_layers_rope_kept(config, layers, "to_window")


def to_window(
    config: ModelConfig,
    state_dict: StateDict,
    calibration: torch.Tensor | None = None,
    *,
    windows: int | list[int | None],
    sinks: bool = False,
    device: str | torch.device = "cpu",
    sink: Sink | None = None,
) -> tuple[ModelConfig, StateDict]:
    """:func:`window_config` on the config; the weights are returned as they are (a new dict, or
    copied to ``sink`` layer by layer), plus with ``sinks`` one sink logit per head of each windowed
    layer, fitted on ``calibration`` so that the windowed layer keeps its source's attention weights on
    the keys it still sees (one layer in memory at a time too; ``device`` runs that fit)."""
    target = window_config(config, windows=windows, sinks=sinks)
    if not sinks:
        return target, map_layers(
            target, state_dict, [[index] for index in range(config.n_layers)], dict, sink
        )
    if calibration is None:
        raise ValueError(
            "to_window: sinks=True fits the sinks on calibration data; pass calibration token ids "
            "(kvforge convert --calib FILE or --calib self)"
        )
    stage = SinkFitStage(config, target, calibration, "to_window", device)
    return target, run_stage(config, state_dict, stage, target, sink)


# ---------------------------------------------------------------------------------------------- record
def parse_windows(text: str) -> int | list[int | None]:
    """``1024`` or a comma pattern ``1024,1024,1024,none`` (``none``/``global`` = a global layer)."""
    values: list[int | None] = []
    for item in text.split(","):
        item = item.strip().lower()
        if item in ("none", "global"):
            values.append(None)
            continue
        try:
            values.append(int(item))
        except ValueError:
            raise ValueError(f"--windows: {item!r} is neither a number of tokens nor 'none'") from None
    return values[0] if len(values) == 1 and values[0] is not None else values


@dataclasses.dataclass(kw_only=True)
class WindowOptions:
    """Sliding windows on chosen layers (the weights do not change)."""

    windows: int | list[int | None] = option(
        help="one window for every layer, or a pattern tiled over the layers; none = global "
        "(e.g. 1024,1024,1024,none = 3 local : 1 global)",
        parse=parse_windows,
    )
    sinks: bool = option(
        False, help="attention sinks on the windowed layers, fitted on calibration (kvforge-typed export)"
    )


WINDOW = Transform("window", to_window, WindowOptions, window_config, calibrates=("sinks", True))
