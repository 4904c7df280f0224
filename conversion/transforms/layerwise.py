"""Convert attention layer by layer (or by groups of layers that share K/V) on calibration data.

The transform supplies a closed-form ``build`` of the new attention modules for one group; this
driver does the rest, identically for every transform: run the calibration stream, hand ``build``
the source modules and activations, refit ``o_proj`` (least squares), optionally refine, write the
new weights under the HF names, and advance the stream.

Independent calibration (default): every layer is fitted on the source model's own inputs to that
layer. Sequential calibration (``sequential=True``): layer ``l`` is fitted on the inputs the
*converted* layers ``0..l-1`` produce, and its target is the source block's output plus the
residual-stream error accumulated so far (``h_src - h_new``), so every layer also repairs what earlier
layers lost. Independent fits lost less on a real checkpoint (docs/transforms.md, "Which inputs each
layer is fitted on").
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from kvforge.arch import ModelConfig
from kvforge.arch.model import DecoderLayer, rotary_key

from ..host import one_cpu_thread
from .balance import balance_values
from .calibration import LayerStream, Rope, rope_tables, source_layer
from .common import EMBEDDINGS, DictSink, Sink, StateDict, attn_prefix, layer_names, sink_result
from .fitting import FitUnit, refine_attention, refit_output_projection, relative_error

# Relative reconstruction error below which a block counts as exact (fp32 round-off is ~1e-14):
# nothing is refitted, so lossless conversions stay bit-for-bit close to the source.
EXACT = 1e-10


@dataclass
class LayerContext:
    """What ``build`` may use for one layer. Activation lists are ``None`` without calibration."""

    index: int
    source: nn.Module  # the source attention module (fp32, frozen)
    source_inputs: list[torch.Tensor] | None  # what the source attention read
    inputs: list[torch.Tensor] | None  # what the new attention will read (sequential: converted prefix)
    targets: list[torch.Tensor] | None  # what the new attention should output
    source_rope: Rope | None
    rope: Rope | None


Build = Callable[[list[LayerContext]], list[nn.Module]]


@dataclass
class FitOptions:
    sequential: bool = False
    refit_output: bool = True
    refine_steps: int = 0
    refine_lr: float = 2e-2  # relative to each tensor's RMS (see .fitting.refine_attention)
    # Calibration sequences per Adam step. Attention's backward dominates a step: one sequence costs a
    # quarter of four, and 100 steps of one sequence at 2e-2 kept stories260K's GQA-2/MQA at +0.35/+0.77
    # (200 steps of four at 1e-2: +0.28/+0.64; docs/results.md, "Refinement cost").
    refine_rows: int = 1
    progress: bool = False
    device: str | torch.device = "cpu"  # where the layers run and the fits are computed


def convert_attention(
    config: ModelConfig,
    state_dict: Mapping[str, torch.Tensor],
    new_config: ModelConfig,
    calibration: torch.Tensor | None,
    build: Build,
    groups: list[list[int]] | None = None,
    options: FitOptions | None = None,
    report: dict | None = None,
    sink: Sink | None = None,
) -> StateDict:
    """New state dict for ``new_config``: attention weights from ``build`` (+ fitting), the rest copied.
    ``report`` (optional) receives the relative reconstruction error of every group.

    One group of layers is in memory (fp32, on ``options.device``) at a time: its source layers are
    read from ``state_dict`` (a dict, or tensors read from disk on access), converted, written to
    ``sink`` (default: a dict, returned) with the layer's other tensors, and the calibration stream
    advances past it."""
    options = options or FitOptions()
    groups = groups or [[index] for index in range(config.n_layers)]
    device = torch.device(options.device)
    dtype = state_dict_dtype(state_dict)
    out = sink if sink is not None else DictSink()
    other, names = layer_names(state_dict)
    out.write({name: state_dict[name] for name in other}, new_config)
    source_stream = new_stream = None
    seq_len = calibration.shape[1] if calibration is not None else 1
    source_ropes = {k: tuple(t.to(device) for t in v) for k, v in rope_tables(config, seq_len).items()}
    ropes = {k: tuple(t.to(device) for t in v) for k, v in rope_tables(new_config, seq_len).items()}
    if calibration is not None:
        source_stream = LayerStream(config, state_dict[EMBEDDINGS].to(device), calibration)
        new_stream = source_stream.copy() if options.sequential else source_stream
    bar = tqdm(groups, desc="converting attention", unit="group", disable=not options.progress, leave=False)
    for group in bar:
        layers = {index: source_layer(config, state_dict, index, device) for index in group}
        contexts = [_context(layers, index, None, None, None, None, None) for index in group]
        if calibration is not None:
            contexts = _calibrated_contexts(
                config, new_config, layers, group, source_stream, new_stream, source_ropes, ropes
            )
        with one_cpu_thread(device.type == "cpu"):  # small dense fits: threads only spin (..host)
            modules = build(contexts)
        exact = False
        if calibration is not None:
            units = [
                FitUnit(
                    module,
                    ctx.inputs,
                    ctx.targets,
                    ropes.get(rotary_key(new_config, new_config.layers[ctx.index])),
                )
                for module, ctx in zip(modules, contexts)
            ]
            for unit, index in zip(units, group):
                source = new_config.layers[index].kv_from
                unit.reads = group.index(source) if source is not None else None
            exact = relative_error(units) < EXACT
            if options.refit_output and not exact:
                refit_output_projection(units)
            if options.refine_steps and not exact:
                refine_attention(units, options.refine_steps, options.refine_lr, options.refine_rows)
            if report is not None:
                report[tuple(group)] = relative_error(units)
            if new_stream is not source_stream:
                _advance(new_config, layers, group, modules, new_stream, ropes)
            _advance(config, layers, group, None, source_stream, source_ropes)
        if not exact:  # merged values at the source's scale, o_proj compensating (exact: powers of two)
            readers = [_position(group, new_config.layers[index].kv_from) for index in group]
            balance_values(modules, [ctx.source for ctx in contexts], readers)
        for module, index in zip(modules, group):
            kept = {
                name: state_dict[name]
                for name in names.get(index, [])
                if not name.startswith(attn_prefix(index))
            }
            new = {
                attn_prefix(index) + name: t.detach().to("cpu", dtype, copy=True)
                for name, t in module.state_dict().items()
            }
            out.write({**kept, **new}, new_config)
        del layers, contexts, modules
    return sink_result(out)


def _position(group: list[int], kv_from: int | None) -> int | None:
    return None if kv_from is None else group.index(kv_from)


def state_dict_dtype(state_dict: Mapping[str, torch.Tensor]) -> torch.dtype:
    """The dtype of the floating-point weights (read from the headers when ``state_dict`` is lazy)."""
    stored = getattr(state_dict, "dtype", None)
    if stored is not None:
        return stored
    return next(t.dtype for t in state_dict.values() if t.is_floating_point())


def new_attention(config: ModelConfig, index: int, weights: StateDict) -> nn.Module:
    """The attention module of layer ``index`` of ``config``, holding ``weights`` (fp32)."""
    with torch.device("meta"):
        layer = DecoderLayer(config, index)
    module = layer.self_attn
    module.load_state_dict({k: v.to(torch.float32) for k, v in weights.items()}, strict=True, assign=True)
    return module.requires_grad_(False)


def _context(layers, index, source_inputs, inputs, targets, source_rope, rope) -> LayerContext:
    return LayerContext(index, layers[index].self_attn, source_inputs, inputs, targets, source_rope, rope)


@torch.no_grad()
def _calibrated_contexts(config, new_config, layers, group, source_stream, new_stream, source_ropes, ropes):
    """Activations for every layer of ``group``. Inside a group the stream advances through the
    source layers (the converted owner does not exist yet); after it, through the converted ones."""
    src, new = source_stream.copy(), new_stream.copy()
    contexts: list[LayerContext] = []
    for position, index in enumerate(group):
        layer = layers[index]
        source_rope = source_ropes.get(rotary_key(config, config.layers[index]))
        source_inputs = src.attention_inputs(layer)
        inputs = source_inputs if new is src else new.attention_inputs(layer)
        targets = [layer.self_attn(x, source_rope, None, 0, None)[0] for x in source_inputs]
        if _same_up_to_roundoff(src.hidden, new.hidden):  # the converted prefix is exact so far
            inputs = source_inputs
        else:  # sequential: repair the residual-stream error accumulated before this layer
            targets = [t + (hs - hn) for t, hs, hn in zip(targets, src.hidden, new.hidden)]
        rope = ropes.get(rotary_key(new_config, new_config.layers[index]))
        contexts.append(_context(layers, index, source_inputs, inputs, targets, source_rope, rope))
        if position + 1 < len(group):
            src.advance(layer, source_rope)
            if new is not src:
                new.advance(layer, source_rope)
    return contexts


def _same_up_to_roundoff(a: list[torch.Tensor], b: list[torch.Tensor], tol: float = 1e-6) -> bool:
    if a is b:
        return True
    diff = sum(float((x.double() - y.double()).pow(2).sum()) for x, y in zip(a, b))
    return diff <= tol**2 * sum(float(x.double().pow(2).sum()) for x in a)


def _advance(config: ModelConfig, layers, group, modules, stream: LayerStream, ropes) -> None:
    """Move ``stream`` past ``group``, through ``modules`` (converted attention) or the source layers."""
    readers = {spec.kv_from for spec in config.layers if spec.kv_from is not None}
    for position, index in enumerate(group):
        layer = layers[index]
        if modules is not None:
            layer = _with_attention(layer, modules[position], config.layers[index])
        stream.advance(
            layer,
            ropes.get(rotary_key(config, config.layers[index])),
            reads=config.layers[index].kv_from,
            keep_view=index in readers,
        )


def _with_attention(layer: DecoderLayer, attention: nn.Module, spec) -> DecoderLayer:
    """``layer`` with its attention swapped (norms and MLP shared, nothing copied)."""
    replacement = DecoderLayer.__new__(DecoderLayer)
    nn.Module.__init__(replacement)
    replacement.index, replacement.spec = layer.index, spec
    replacement.input_layernorm = layer.input_layernorm
    replacement.self_attn = attention
    replacement.post_attention_layernorm = layer.post_attention_layernorm
    replacement.mlp = layer.mlp
    replacement.attention_output_layernorm = layer.attention_output_layernorm  # Gemma's sandwich norms
    replacement.post_feedforward_layernorm = layer.post_feedforward_layernorm
    return replacement
