"""Which parameters a run trains (``KVForgeLM(trainable=...)``): a registry of name predicates over the
model's HF parameter names. The rest are frozen (``requires_grad=False``): no weight gradients, no
optimizer state. ``attention`` trains every attention projection and norm (``*.self_attn.*``), converted
or not, so a conversion and the unconverted control train the same kind of parameters."""

from __future__ import annotations

from collections.abc import Callable

import torch

TRAINABLE: dict[str, Callable[[str], bool]] = {
    "all": lambda name: True,
    "attention": lambda name: ".self_attn." in name,
}


def check_trainable(trainable: str) -> None:
    if trainable not in TRAINABLE:
        raise ValueError(f"trainable={trainable!r}: allowed values are {sorted(TRAINABLE)}")


def apply_trainable_(model: torch.nn.Module, trainable: str) -> int:
    """Freeze every parameter ``trainable`` does not select; return how many elements stay trainable."""
    check_trainable(trainable)
    keep, count = TRAINABLE[trainable], 0
    for name, param in model.named_parameters():
        param.requires_grad_(keep(name))
        count += param.numel() if keep(name) else 0
    if count == 0:
        raise ValueError(f"trainable={trainable!r} selects no parameter of this model")
    return count
