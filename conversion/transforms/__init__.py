"""Checkpoint transforms: pure functions ``(config, state_dict, calibration=None, **options) -> (config, state_dict)``.

``calibration`` is a ``(batch, seq)`` LongTensor of token ids from text that is *not* the evaluation
text; transforms that need activations run the source model on it. Inputs are never modified.

``TRANSFORMS`` lists one :class:`~.record.Transform` record per transform (function, options dataclass,
whether it calibrates, how it streams); a record is called like its function. ``kvforge convert``'s
flags, YAML ``model.convert`` and the table in docs/transforms.md come from it. A new transform is its
module plus one line below (docs/extending.md). ``check_options(name, config, **options)`` validates
options against a config alone (no weights), so a command can refuse bad input before reading anything
large.
"""

from __future__ import annotations

from typing import Any

from kvforge.arch import ModelConfig

from .calibration import load_calibration_ids, sample_calibration_ids
from .chunked import CHUNKED, to_chunked
from .cla import CLA, to_cla
from .constant_state import DELTANET, LINEAR, to_deltanet, to_linear
from .gla import GLA, to_gla
from .gqa import GQA, MQA, to_gqa, to_mqa
from .gta import GTA, to_gta
from .mla import MLA, to_mla
from .record import Transform
from .window import WINDOW, to_window

TRANSFORMS: dict[str, Transform] = {
    record.name: record for record in (GQA, MQA, MLA, CLA, WINDOW, CHUNKED, GTA, GLA, LINEAR, DELTANET)
}


def transform(name: str, where: str = "transform") -> Transform:
    """The record named ``name``; an unknown name is an error listing the registered ones."""
    if name not in TRANSFORMS:
        raise ValueError(f"{where}={name!r}: allowed values are {sorted(TRANSFORMS)}")
    return TRANSFORMS[name]


def check_options(name: str, config: ModelConfig, **options: Any) -> Any:
    """The typed options of ``TRANSFORMS[name]`` (a ``ValueError`` for any the transform would refuse on
    ``config``: unknown, missing, of the wrong type or out of range)."""
    record = transform(name)
    parsed = record.parse(options)
    record.check_options(config, parsed)
    return parsed


__all__ = [
    "TRANSFORMS",
    "Transform",
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
    "transform",
]
