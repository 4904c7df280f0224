"""Helpers shared by the transforms."""

from __future__ import annotations

import torch

from kvforge.arch import ModelConfig

StateDict = dict[str, torch.Tensor]


def attn_prefix(layer: int) -> str:
    return f"model.layers.{layer}.self_attn."


def copy_state_dict(state_dict: StateDict) -> StateDict:
    """A shallow copy: transforms replace entries, never mutate the caller's tensors."""
    return dict(state_dict)


def check_gqa_source(config: ModelConfig, what: str) -> None:
    for index, spec in enumerate(config.layers):
        if spec.attention != "gqa":
            raise ValueError(
                f"{what}: layer {index} is {spec.attention!r}; this transform needs gqa (MHA/GQA) layers"
            )


def is_count(value: object) -> bool:
    """An int that is not a bool (YAML ``true`` and ``"2"`` must not pass as a head count)."""
    return isinstance(value, int) and not isinstance(value, bool)
