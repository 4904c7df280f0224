"""What a transform would make of a config, known before any weight is read: its target config, and
whether that is the source itself (a no-op such as ``to_mqa`` on an MQA model).

``kvforge convert`` uses it to say "nothing to change" and copy the weights through without sampling
calibration text; ``source_check`` refuses a source a transform can never convert before asking for
the transform's own options, so the refusal names the real cause.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from kvforge.arch import ModelConfig

from . import FIT_OPTIONS, check_options
from .chunked import chunked_config
from .cla import cla_layout
from .common import Sink, StateDict, check_gqa_source, map_layers
from .gla import gla_config
from .gqa import gqa_config
from .gta import gta_config

# mla's source check has no public name; it is the first thing check_mla_options runs
from .mla import _check_source as check_mla_source
from .window import window_config


def _gla_target(config: ModelConfig, **options) -> ModelConfig | None:
    # from MHA/GQA, to_gla goes through to_mla first, whose config the weights decide
    return None if config.forms == {"gqa"} else gla_config(config, **options)


# name -> the target config from (config, **options), None where the weights decide it (mla: always a change).
TARGETS: dict[str, Callable[..., ModelConfig | None]] = {
    "gqa": gqa_config,
    "mqa": lambda config, **options: gqa_config(config, n_kv_heads=1, **options),
    "cla": lambda config, **options: cla_layout(config, **options)[0],
    "window": window_config,
    "chunked": chunked_config,
    "gta": lambda config, **options: gta_config(config),
    "gla": _gla_target,
}


def _gla_source(config: ModelConfig) -> None:
    if config.forms == {"gqa"}:
        check_mla_source(config)


# name -> what the source alone must satisfy, whatever the options.
SOURCE_CHECKS: dict[str, Callable[[ModelConfig], None]] = {
    "gqa": lambda config: check_gqa_source(config, "to_gqa"),
    "mqa": lambda config: check_gqa_source(config, "to_mqa"),
    "cla": lambda config: check_gqa_source(config, "to_cla"),
    "mla": check_mla_source,
    "gta": gta_config,
    "gla": _gla_source,
}


def source_check(name: str, config: ModelConfig) -> None:
    """Raise ``ValueError`` when no options of transform ``name`` could convert ``config``."""
    check = SOURCE_CHECKS.get(name)
    if check is not None:
        check(config)


def target_config(name: str, config: ModelConfig, **options) -> ModelConfig | None:
    """The config ``TRANSFORMS[name](config, ..., **options)`` returns (options validated first); None
    where it depends on the weights."""
    check_options(name, config, **options)
    target = TARGETS.get(name)
    if target is None:
        return None
    return target(config, **{k: v for k, v in options.items() if k not in FIT_OPTIONS})


def _layout(config: ModelConfig) -> dict:
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.name != "pattern"}


def is_noop(name: str, config: ModelConfig, **options) -> bool:
    """Whether transform ``name`` with ``options`` would leave ``config`` as it is (then the weights
    need not change either: :func:`copy_through`)."""
    target = target_config(name, config, **options)
    return target is not None and _layout(target) == _layout(config)


def copy_through(
    config: ModelConfig,
    state_dict: StateDict,
    calibration=None,
    *,
    sink: Sink | None = None,
) -> tuple[ModelConfig, StateDict]:
    """The identity transform: every tensor passes through, one layer at a time (into ``sink``)."""
    return config, map_layers(config, state_dict, [[index] for index in range(config.n_layers)], dict, sink)
