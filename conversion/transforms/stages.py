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
from kvforge.arch.model import rotary_key

from .calibration import LayerStream, rope_tables, source_layer
from .common import EMBEDDINGS, DictSink, Sink, StateDict, layer_names, map_layers, sink_result


class LayerStage(Protocol):
    def other(self, tensors: StateDict) -> StateDict:
        """The tensors outside the layers (given before any layer), converted."""
        ...

    def layer(self, index: int, tensors: StateDict) -> StateDict:
        """Layer ``index``'s tensors (layers come in order), converted."""
        ...


class MeasuredStage:
    """A stage that first measures each source layer on the calibration stream (when there is one: the
    stream through the source layers before it), then converts the layer with what it measured.
    Subclasses give :meth:`measure` and :meth:`convert`."""

    def __init__(self, config: ModelConfig, calibration: torch.Tensor | None, device) -> None:
        self.config, self.calibration, self.device = config, calibration, torch.device(device)
        self.stream: LayerStream | None = None

    def other(self, tensors: StateDict) -> StateDict:
        if self.calibration is not None:
            self.stream = LayerStream(self.config, tensors[EMBEDDINGS].to(self.device), self.calibration)
            tables = rope_tables(self.config, self.calibration.shape[1])
            self.ropes = {k: tuple(t.to(self.device) for t in v) for k, v in tables.items()}
        return tensors

    @torch.no_grad()
    def layer(self, index: int, tensors: StateDict) -> StateDict:
        measured = None
        if self.stream is not None:
            layer = source_layer(self.config, tensors, index, self.device)
            measured = self.measure(layer, self.stream.attention_inputs(layer))
            self.stream.advance(layer, self.ropes.get(rotary_key(self.config, self.config.layers[index])))
        return self.convert(index, tensors, measured)

    def measure(self, layer: torch.nn.Module, inputs: list[torch.Tensor]):
        raise NotImplementedError

    def convert(self, index: int, tensors: StateDict, measured) -> StateDict:
        raise NotImplementedError


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
