"""Per-layer stages: a transform whose math needs one layer (and the calibration stream before it) at a
time, written as a :class:`Sink` that converts what it receives and passes it on.

A stage sees the tensors outside the layers first (embeddings: where a calibration stream starts),
then each layer in order, which is the order :func:`~.common.map_layers` and
:func:`~.layerwise.convert_attention` write in. So the same stage runs on a state dict read a layer
at a time (``map_layers(..., sink=StageSink(...))``) and behind another transform's output
(``to_gla`` on an MHA/GQA source: ``to_mla`` writes into the GLA stage), and only one layer is in
memory at a time either way.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Protocol

import torch

from kvforge.arch import ModelConfig

from .common import DictSink, Sink, StateDict, layer_names, map_layers, sink_result


class LayerStage(Protocol):
    def other(self, tensors: StateDict) -> StateDict:
        """The tensors outside the layers (given before any layer), converted."""
        ...

    def layer(self, index: int, tensors: StateDict) -> StateDict:
        """Layer ``index``'s tensors (layers come in order), converted."""
        ...


class StageSink:
    """A sink that converts what it receives with a stage and writes the result to ``sink``.

    ``make(config)`` builds the stage and its target config from the config of the first write (the
    upstream transform's target, which a chained stage may only learn then)."""

    def __init__(
        self, make: Callable[[ModelConfig], tuple[LayerStage, ModelConfig]], sink: Sink | None
    ) -> None:
        self.make, self.sink = make, sink if sink is not None else DictSink()
        self.stage: LayerStage | None = None
        self.target: ModelConfig | None = None
        self.next_layer = 0

    def write(self, tensors: StateDict, config: ModelConfig) -> None:
        if self.stage is None:
            self.stage, self.target = self.make(config)
        other, layers = layer_names(tensors)
        if other:
            if self.next_layer:
                raise ValueError(f"stage: tensors {sorted(other)[:3]} outside the layers came after layer 0")
            self.sink.write(self.stage.other({name: tensors[name] for name in other}), self.target)
        for index in sorted(layers):
            if index < self.next_layer:
                raise ValueError(
                    f"stage: layer {index} came after layer {self.next_layer - 1}; layers come in order"
                )
            self.sink.write(
                self.stage.layer(index, {name: tensors[name] for name in layers[index]}), self.target
            )
            self.next_layer = index + 1

    def result(self) -> StateDict:
        return sink_result(self.sink)


def run_stage(
    config: ModelConfig,
    state_dict: Mapping[str, torch.Tensor],
    stage: LayerStage,
    target: ModelConfig,
    sink: Sink | None = None,
) -> StateDict:
    """``state_dict`` (of ``config``) read a layer at a time through ``stage`` into ``sink`` (default: a
    dict, returned)."""
    staged = StageSink(lambda _: (stage, target), sink)
    map_layers(config, state_dict, [[index] for index in range(config.n_layers)], dict, staged)
    return staged.result()
