"""Checkpoint transforms: pure functions ``(config, state_dict, calibration=None, **options) -> (config, state_dict)``.

``calibration`` is a ``(batch, seq)`` LongTensor of token ids from text that is *not* the evaluation
text; transforms that need activations run the source model on it. Inputs are never modified.
``check_options(name, config, **options)`` validates a transform's options against a config alone
(no weights), so a command can refuse bad input before reading anything large.
"""

from __future__ import annotations

from collections.abc import Callable

from kvforge.arch import ModelConfig

from .calibration import load_calibration_ids, sample_calibration_ids
from .chunked import chunked_config, to_chunked
from .cla import cla_layout, to_cla
from .constant_state import state_config, to_deltanet, to_linear
from .gla import gla_config, to_gla
from .gqa import gqa_config, to_gqa, to_mqa
from .gta import gta_config, to_gta
from .mla import check_mla_options, to_mla
from .window import to_window, window_config

TRANSFORMS: dict[str, Callable] = {
    "gqa": to_gqa,
    "mqa": to_mqa,
    "mla": to_mla,
    "cla": to_cla,
    "window": to_window,
    "chunked": to_chunked,
    "gta": to_gta,
    "gla": to_gla,
    "linear": to_linear,
    "deltanet": to_deltanet,
}

# Option names that are not about the target form (how to fit it).
FIT_OPTIONS = ("sequential", "refine_steps", "progress", "device", "sink", "transfer_lr", "report")

_CHECKS: dict[str, Callable] = {
    "gqa": gqa_config,
    "mqa": lambda config, **options: gqa_config(config, n_kv_heads=1, **options),
    "mla": check_mla_options,
    "cla": cla_layout,
    "window": window_config,
    "chunked": chunked_config,
    "gta": lambda config, **options: gta_config(config),
    "gla": gla_config,
    "linear": lambda config, **options: state_config(config, "linear", **options),
    "deltanet": lambda config, **options: state_config(config, "deltanet", **options),
}


def check_options(name: str, config: ModelConfig, **options) -> None:
    """Raise ``ValueError`` for options ``TRANSFORMS[name]`` would refuse (checked on the config only)."""
    if name not in TRANSFORMS:
        raise ValueError(f"unknown transform {name!r}: allowed values are {sorted(TRANSFORMS)}")
    _CHECKS[name](config, **{k: v for k, v in options.items() if k not in FIT_OPTIONS})


__all__ = [
    "TRANSFORMS",
    "check_options",
    "load_calibration_ids",
    "sample_calibration_ids",
    "to_chunked",
    "to_cla",
    "to_deltanet",
    "to_gla",
    "to_gqa",
    "to_gta",
    "to_linear",
    "to_mla",
    "to_mqa",
    "to_window",
]
