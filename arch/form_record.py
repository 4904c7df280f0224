"""What an attention form declares about itself: one :class:`AttentionForm` record per
``LayerSpec.attention`` value, written beside its block in ``attention_*.py`` and listed in
:mod:`.forms`.

Every fact is a function of the model config and the layer's spec, so accounting
(:mod:`.kv_bytes`, :mod:`.flops`, :mod:`.memory`), the decoder (blocks, rotary tables, cache) and
``ModelConfig``'s checks read the record and never name a form. Facts of a layer that reads another
layer's K/V (``kv_from``) are the form's to count: its cache values are 0 whatever the form says.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from .cache import LayerCache, allocate_layer_cache

if TYPE_CHECKING:  # annotations only: config.py imports the registry, which imports this module
    from .config import LayerSpec, ModelConfig, RopeScaling

# Model-wide options a form may implement; ModelConfig refuses them on layers of forms that do not.
TRAITS = ("nope", "window_rope_theta", "attn_logit_softcap", "query_pre_attn_scalar")


@dataclass(frozen=True)
class Rotary:
    """A rotary table a layer reads: ``dim`` rotated dims at base ``theta``. Layers whose forms name
    the same table share one :class:`~.rope.RotaryEmbedding`."""

    name: str
    dim: int
    theta: float
    scaling: RopeScaling | None = None


def cache_by_span(
    block: nn.Module, spec: LayerSpec, batch: int, max_len: int, dtype: torch.dtype, device
) -> LayerCache:
    """The K/V cache of :mod:`.cache`: dense, a ring of ``window`` slots or ``chunk`` slots, each
    position holding the block's ``cache_features()``."""
    return allocate_layer_cache(
        batch, max_len, spec.window, block.cache_features(), dtype, device, spec.chunk
    )


def no_state(config: ModelConfig, spec: LayerSpec, itemsize: int) -> int:
    return 0


def no_model_check(config: ModelConfig) -> None:
    return None


def no_layer_check(config: ModelConfig, index: int, spec: LayerSpec) -> None:
    return None


def form_name(config: ModelConfig, spec: LayerSpec) -> str:
    return spec.attention


@dataclass(frozen=True)
class AttentionForm:
    """The facts of one attention form.

    Args:
        name: the ``LayerSpec.attention`` value.
        block: the attention module, built as ``block(config, spec)``; its ``forward(x, rope, cache,
            start, shared, document_ids)`` returns ``(output, view)`` (see :class:`.attention_gqa.GQAAttention`).
        kv_values_per_token: values one token adds to the cache of a layer that owns its cache.
        parameters: parameters of the block (attention sinks are counted for every form).
        projection_weights: matmul weights one token passes through in the block (FLOPs, PaLM's count).
        mixing_multiply_adds: multiply-adds per token of mixing over ``context`` visible keys
            (softmax attention: scores and the weighted sum of values).
        activation_values: values autograd keeps per token for the block's backward.
        rotary: the rotary table a layer reads (None: no table).
        label: how ``describe_layers`` and ``kvforge inspect`` name a layer.
        layer_fields: the optional ``LayerSpec`` fields the form reads (``n_kv_heads``,
            ``n_latent_heads``): refused on layers of other forms, inherited through ``kv_from``.
        check_layer: per-layer checks of a layer that owns its cache (may fill defaults).
        check_model: model-wide checks, run once when any layer has this form (may fill defaults).
        traits: which of :data:`TRAITS` the form implements.
        state_bytes_per_sequence: bytes a layer keeps per sequence whatever its length (a
            constant-size recurrent state), given the cache element size.
        new_cache: the layer's cache entry, ``new_cache(block, spec, batch, max_len, dtype, device)``.
    """

    name: str
    block: type[nn.Module]
    kv_values_per_token: Callable[[ModelConfig, LayerSpec], int]
    parameters: Callable[[ModelConfig, LayerSpec], int]
    projection_weights: Callable[[ModelConfig, LayerSpec], float]
    mixing_multiply_adds: Callable[[ModelConfig, LayerSpec, int], int]
    activation_values: Callable[[ModelConfig, LayerSpec], int]
    rotary: Callable[[ModelConfig, LayerSpec], Rotary | None]
    label: Callable[[ModelConfig, LayerSpec], str] = form_name
    layer_fields: tuple[str, ...] = ()
    check_layer: Callable[[ModelConfig, int, LayerSpec], None] = no_layer_check
    check_model: Callable[[ModelConfig], None] = no_model_check
    traits: frozenset[str] = frozenset()
    state_bytes_per_sequence: Callable[[ModelConfig, LayerSpec, int], int] = no_state
    new_cache: Callable[..., LayerCache] = cache_by_span

    def __post_init__(self) -> None:
        unknown = sorted(set(self.traits) - set(TRAITS))
        if unknown:
            raise ValueError(
                f"AttentionForm {self.name!r}: unknown traits {unknown}; allowed are {list(TRAITS)}"
            )
