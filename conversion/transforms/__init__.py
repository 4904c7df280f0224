"""Checkpoint transforms: pure functions ``(config, state_dict, calibration=None, **options) -> (config, state_dict)``.

``calibration`` is a ``(batch, seq)`` LongTensor of token ids from text that is *not* the evaluation
text; transforms that need activations run the source model on it. Inputs are never modified.
"""

from .cla import to_cla
from .gqa import to_gqa, to_mqa
from .mla import to_mla
from .window import to_window

TRANSFORMS = {"gqa": to_gqa, "mqa": to_mqa, "mla": to_mla, "cla": to_cla, "window": to_window}

__all__ = ["TRANSFORMS", "to_cla", "to_gqa", "to_mla", "to_mqa", "to_window"]
