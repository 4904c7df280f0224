"""Llama 4's layer pattern on an existing checkpoint: chunked local layers with a global NoPE layer
every ``global_every`` layers; the weights do not change.

A local layer attends within fixed chunks of ``chunk`` tokens (``LayerSpec(chunk=C)``, at most C
cached positions); layers ``global_every - 1, 2·global_every - 1, ...`` stay global and, with
``nope=True``, drop RoPE (Llama 4's ``no_rope_layers``: position information then comes from the
local layers alone). ``nope=False`` keeps RoPE on the global layers - the gentler conversion for
a checkpoint trained with RoPE everywhere, since a NoPE layer sees keys it was never trained on.
"""

from __future__ import annotations

import dataclasses

import torch

from kvforge.arch import ModelConfig

from .common import Sink, StateDict, is_count, map_layers, with_layers_rope_kept
from .record import Transform, option


def chunked_config(
    config: ModelConfig, *, chunk: int, global_every: int | None = 4, nope: bool = True
) -> ModelConfig:
    """The target config of :func:`to_chunked` (validates the options on the config alone)."""
    if not is_count(chunk) or not 0 < chunk < config.max_seq_len:
        raise ValueError(
            f"to_chunked: chunk={chunk!r} must be an integer in 1..{config.max_seq_len - 1} "
            f"(a chunk of max_seq_len={config.max_seq_len} or more is global attention)"
        )
    if global_every is not None and (not is_count(global_every) or not 2 <= global_every <= config.n_layers):
        raise ValueError(
            f"to_chunked: global_every={global_every!r} must be in 2..n_layers={config.n_layers} "
            "(layer global_every-1 and every global_every-th after it stay global), or None for no global layer"
        )
    if not isinstance(nope, bool):
        raise ValueError(f"to_chunked: nope={nope!r} must be true or false")
    layers = []
    for index, spec in enumerate(config.layers):
        if spec.kv_from is not None:
            raise ValueError(
                f"to_chunked: layer {index} reads layer {spec.kv_from}'s K/V; chunk the model before to_cla"
            )
        is_global = global_every is not None and index % global_every == global_every - 1
        if is_global and nope and spec.attention != "gqa":
            raise ValueError(
                f"to_chunked: layer {index} would be a global NoPE layer but is {spec.attention!r}; NoPE is "
                "for gqa layers (pass nope=False, or choose global_every so that it stays local)"
            )
        rope = spec.rope and not (is_global and nope)
        layers.append(dataclasses.replace(spec, chunk=None if is_global else chunk, window=None, rope=rope))
    return with_layers_rope_kept(config, layers, "to_chunked")


def to_chunked(
    config: ModelConfig,
    state_dict: StateDict,
    calibration: torch.Tensor | None = None,
    *,
    chunk: int,
    global_every: int | None = 4,
    nope: bool = True,
    sink: Sink | None = None,
) -> tuple[ModelConfig, StateDict]:
    """:func:`chunked_config` on the config; the weights are returned as they are (a new dict, or
    copied to ``sink`` layer by layer)."""
    target = chunked_config(config, chunk=chunk, global_every=global_every, nope=nope)
    return target, map_layers(target, state_dict, [[index] for index in range(config.n_layers)], dict, sink)


# ---------------------------------------------------------------------------------------------- record
@dataclasses.dataclass(kw_only=True)
class ChunkedOptions:
    """Llama 4's pattern: chunked local layers and a global (NoPE) layer every N."""

    chunk: int = option(help="tokens per chunk of the local layers (attention_chunk_size)")
    global_every: int | None = option(4, help="every N-th layer stays global (None: no global layer)")
    nope: bool = option(True, help="the global layers drop RoPE (Llama 4's NoPE); --no-nope keeps it")


CHUNKED = Transform("chunked", to_chunked, ChunkedOptions, chunked_config)
