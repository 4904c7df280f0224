"""Helpers shared by the transforms."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Protocol

import torch

from kvforge.arch import ModelConfig

StateDict = dict[str, torch.Tensor]


EMBEDDINGS = "model.embed_tokens.weight"


def layer_prefix(layer: int) -> str:
    return f"model.layers.{layer}."


def attn_prefix(layer: int) -> str:
    return f"{layer_prefix(layer)}self_attn."


class Sink(Protocol):
    """Where a transform puts its output tensors, a few at a time (a dict, or shards on disk), with
    the config they belong to (the target's, known before the first write)."""

    def write(self, tensors: StateDict, config: ModelConfig) -> None: ...


class DictSink:
    """The in-memory sink: ``tensors`` is the transform's output state dict."""

    def __init__(self) -> None:
        self.tensors: StateDict = {}

    def write(self, tensors: StateDict, config: ModelConfig) -> None:
        self.tensors.update(tensors)


def sink_result(sink: Sink) -> StateDict:
    """What a transform returns: the state dict it built, or ``{}`` when it wrote to the caller's sink."""
    return sink.tensors if isinstance(sink, DictSink) else {}


def layer_names(state_dict: Mapping[str, torch.Tensor]) -> tuple[list[str], dict[int, list[str]]]:
    """Names outside the layers (embeddings, final norm, head), and each layer's names (keys only)."""
    other: list[str] = []
    layers: dict[int, list[str]] = {}
    for name in state_dict:
        parts = name.split(".", 3)
        if len(parts) > 3 and parts[:2] == ["model", "layers"] and parts[2].isdigit():
            layers.setdefault(int(parts[2]), []).append(name)
        else:
            other.append(name)
    return other, layers


def map_layers(
    config: ModelConfig,
    state_dict: Mapping[str, torch.Tensor],
    groups: list[list[int]],
    change: Callable[[StateDict], StateDict],
    sink: Sink | None = None,
) -> StateDict:
    """Apply ``change`` to the tensors of each group of layers in turn (``config``: the target's) (one group in memory at a time)
    and write the result to ``sink``; tensors outside the layers pass through. Returns the new state
    dict (``{}`` when it went to ``sink``)."""
    out = sink if sink is not None else DictSink()
    other, layers = layer_names(state_dict)
    out.write({name: state_dict[name] for name in other}, config)
    for group in groups:
        part = {name: state_dict[name] for index in group for name in layers.get(index, [])}
        out.write(change(part), config)
    return sink_result(out)


def copy_state_dict(state_dict: StateDict) -> StateDict:
    """A shallow copy: transforms replace entries, never mutate the caller's tensors."""
    return dict(state_dict)


def check_gqa_source(config: ModelConfig, what: str) -> None:
    for index, spec in enumerate(config.layers):
        if spec.attention != "gqa":
            raise ValueError(
                f"{what}: layer {index} is {spec.attention!r}; this transform needs gqa (MHA/GQA) layers"
            )


def rms(tensor: torch.Tensor) -> float:
    """Root mean square of every element, in float64 (a weight's scale)."""
    return float(tensor.detach().to(torch.float64).pow(2).mean().sqrt())


def is_count(value: object) -> bool:
    """An int that is not a bool (YAML ``true`` and ``"2"`` must not pass as a head count)."""
    return isinstance(value, int) and not isinstance(value, bool)


def check_rope_kept(source: ModelConfig, target: ModelConfig, what: str) -> None:
    """A transform that makes layers slide (or stop sliding) must not change their RoPE: where sliding
    layers rotate with their own base (Gemma 3's ``window_rope_theta``), such a layer would."""
    if source.window_rope_theta is None:
        return
    scaling = source.rope_scaling
    local = f"window_rope_theta={source.window_rope_theta}, unscaled"
    full = f"rope_theta={source.rope_theta}, " + (
        f"{scaling.type} x{scaling.factor}" if scaling else "unscaled"
    )
    for index, (before, after) in enumerate(zip(source.layers, target.layers)):
        if (before.window is None) != (after.window is None):
            was, becomes = (full, local) if before.window is None else (local, full)
            raise ValueError(
                f"{what}: layer {index} would change from {'global' if before.window is None else 'sliding'} to "
                f"{'sliding' if before.window is None else 'global'} attention, and with it its RoPE ({was} -> "
                f"{becomes}): this model rotates sliding and global layers differently (Gemma 3). Change only "
                "the window sizes of the layers that already slide"
            )


def with_layers_rope_kept(config: ModelConfig, layers: list, what: str) -> ModelConfig:
    """``config`` with these layers (its pattern dropped), refused by :func:`check_rope_kept` where a
    layer would change between sliding and global attention on a model that rotates them differently."""
    target = dataclasses.replace(config, layers=layers, pattern=None)
    check_rope_kept(config, target, what)
    return target
