"""What a transform would make of a config, known before any weight is read: its target config, and
whether that is the source itself (a no-op such as ``to_mqa`` on an MQA model).

``kvforge convert`` uses it to say "nothing to change" and copy the weights through without sampling
calibration text; ``source_check`` refuses a source a transform can never convert before asking for
the transform's own options, so the refusal names the real cause.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from kvforge.arch import ModelConfig

from . import transform
from .chunked import chunked_config
from .cla import cla_layout
from .common import Sink, StateDict, check_gqa_source, map_layers
from .gla import gla_config
from .gqa import gqa_config
from .gta import gta_config

# mla's source check has no public name; it is the first thing check_mla_options runs
from .mla import _check_source as check_mla_source
from .record import Transform
from .window import window_config


def _gla_source(config: ModelConfig) -> None:
    if config.forms == {"gqa"}:  # from MHA/GQA, to_gla goes through to_mla first
        check_mla_source(config)


# ``--to`` name -> what the source alone must satisfy, whatever the options (a name not listed: nothing
# beyond its options' checks).
SOURCE_CHECKS: dict[str, Callable[[ModelConfig], None]] = {
    "gqa": lambda config: check_gqa_source(config, "to_gqa"),
    "mqa": lambda config: check_gqa_source(config, "to_mqa"),
    "cla": lambda config: check_gqa_source(config, "to_cla"),
    "mla": check_mla_source,
    "gta": gta_config,
    "gla": _gla_source,
    "linear": lambda config: check_gqa_source(config, "to_linear"),
    "deltanet": lambda config: check_gqa_source(config, "to_deltanet"),
}


def source_check(name: str, config: ModelConfig) -> None:
    """Raise ``ValueError`` when no options of transform ``name`` could convert ``config``."""
    check = SOURCE_CHECKS.get(name)
    if check is not None:
        check(config)


def _gla_target(config: ModelConfig, **options: Any) -> ModelConfig | None:
    # from MHA/GQA, to_gla goes through to_mla first, whose config the weights decide
    return None if config.forms == {"gqa"} else gla_config(config, **options)


# ``--to`` name -> its target config from (config, **options), where the config alone decides it. A name not
# listed (mla: its sizes come from the fit) is never a no-op.
TARGETS: dict[str, Callable[..., ModelConfig | None]] = {
    "gqa": gqa_config,
    "mqa": lambda config, **options: gqa_config(config, n_kv_heads=1, **options),
    "cla": lambda config, **options: cla_layout(config, **options)[0],
    "window": window_config,
    "chunked": chunked_config,
    "gta": gta_config,
    "gla": _gla_target,
}


def target_config(name: str, config: ModelConfig, **options: Any) -> ModelConfig | None:
    """The config ``TRANSFORMS[name](config, ..., **options)`` returns (the options validated first: a
    ``ValueError`` for any the transform would refuse); None where the weights decide it."""
    record = transform(name)
    kwargs = record.option_kwargs(record.parse(options))
    record.check(config, **kwargs)
    target = TARGETS.get(name)
    return target(config, **kwargs) if target is not None else None


def _layout(config: ModelConfig) -> dict:
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.name != "pattern"}


def is_noop(name: str, config: ModelConfig, **options: Any) -> bool:
    """Whether transform ``name`` with ``options`` would leave ``config`` as it is (then the weights need
    not change either: :data:`COPY_THROUGH`)."""
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


@dataclasses.dataclass
class CopyOptions:
    """Copy every tensor through unchanged (what a no-op conversion runs)."""


# Not in TRANSFORMS (no ``--to`` value): the converter runs it in place of a transform that would change nothing.
COPY_THROUGH = Transform("copy", copy_through, CopyOptions, lambda config: config)
