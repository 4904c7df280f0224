"""MHA/GQA → fewer K/V heads (GQA, MQA).

- ``method="mean"``: the GQA paper's (Ainslie et al., 2023) baseline, mean-pooling the K and V heads
  of each group of consecutive heads.
- ``method="aligned"`` (default): choose which query heads share a K/V head by how well their keys
  and values merge, merge keys per rotary pair with a complex scale per head (the only RoPE-safe
  map, folded into the query), merge values into their best common subspace (folded into
  ``o_proj``) - see :mod:`.merge` - then, with calibration ids, refit ``o_proj`` by least squares
  against the source block's output (and optionally refine, :mod:`.fitting`). Query heads are
  permuted so that each group is contiguous, as the GQA layout requires; copies of one head (an
  MHA checkpoint made from a GQA one) merge exactly. With q/k norm (Qwen3) keys are not linear in the
  input: heads merge as normalised heads aligned by a sign per rotary pair (:mod:`.qk_norm`;
  approximate, exact for copies), ``k_norm`` kept on the merged head.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch

from kvforge.arch import ModelConfig

from .calibration import check_calibration
from .common import Sink, StateDict, attn_prefix, check_gqa_source, copy_state_dict, is_count, map_layers
from .layerwise import FitOptions, LayerContext, convert_attention, new_attention
from .merge import best_partition, group_cost, merge_keys, merge_values, output_blocks
from .qk_norm import merge_signed, normalised_targets, signed_group_cost
from .record import FittedOptions, Transform, option
from .rotary import from_pairs, scale_pairs
from .whitening import head_targets, layer_whitening, rows_with_bias, split_bias

METHODS = ("aligned", "mean")


def gqa_config(config: ModelConfig, *, n_kv_heads: int, method: str = "aligned") -> ModelConfig:
    """The target config of :func:`to_gqa` (validates the options; no weights needed)."""
    check_gqa_source(config, "to_gqa")
    if method not in METHODS:
        raise ValueError(f"to_gqa: method={method!r}: allowed values are {list(METHODS)}")
    if not is_count(n_kv_heads) or n_kv_heads <= 0 or config.n_heads % n_kv_heads:
        allowed = [d for d in range(1, config.n_heads + 1) if config.n_heads % d == 0]
        raise ValueError(
            f"to_gqa: n_kv_heads={n_kv_heads!r} must divide n_heads={config.n_heads} (allowed: {allowed})"
        )
    for index, spec in enumerate(config.layers):
        if spec.kv_from is None and n_kv_heads > spec.n_kv_heads:
            raise ValueError(
                f"to_gqa: layer {index} has n_kv_heads={spec.n_kv_heads}; n_kv_heads={n_kv_heads} would add heads "
                "(allowed: at most the current count)"
            )
        if method == "mean" and spec.kv_from is None and spec.n_kv_heads % n_kv_heads:
            raise ValueError(
                f"to_gqa: layer {index} has n_kv_heads={spec.n_kv_heads}, which n_kv_heads={n_kv_heads} "
                "does not divide; mean-pooling needs whole groups of heads (method='aligned' does not)"
            )
    if method == "aligned" and any(spec.kv_from is not None for spec in config.layers):
        raise ValueError("to_gqa: method='aligned' needs unshared layers; apply to_gqa before to_cla")
    layers = [dataclasses.replace(spec, n_kv_heads=n_kv_heads) for spec in config.layers]
    return dataclasses.replace(config, n_kv_heads=n_kv_heads, layers=layers, pattern=None)


def to_gqa(
    config: ModelConfig,
    state_dict: StateDict,
    calibration: torch.Tensor | None = None,
    *,
    n_kv_heads: int,
    method: str = "aligned",
    sequential: bool = True,
    refine_steps: int = 0,
    progress: bool = False,
    device: str | torch.device = "cpu",
    sink: Sink | None = None,
) -> tuple[ModelConfig, StateDict]:
    """``n_kv_heads`` K/V heads on every layer. ``calibration``: ``(batch, seq)`` ids of text that is
    not the evaluation text (``aligned`` also works without, from the weights alone). ``device``: where
    the layers run and the fits are computed; ``sink``: where the output tensors go, one layer at a
    time (default: the returned dict)."""
    new_config = gqa_config(config, n_kv_heads=n_kv_heads, method=method)
    calibration = check_calibration(calibration, config, "to_gqa")
    every_layer = [[index] for index in range(config.n_layers)]
    if method == "mean":
        return new_config, map_layers(
            new_config, state_dict, every_layer, lambda part: _mean_pool_all(config, part, n_kv_heads), sink
        )
    if all(spec.n_kv_heads == n_kv_heads for spec in config.layers):
        return new_config, map_layers(new_config, state_dict, every_layer, dict, sink)

    def build(contexts: list[LayerContext]) -> list[torch.nn.Module]:
        return [_aligned_layer(config, new_config, ctx) for ctx in contexts]

    options = FitOptions(sequential=sequential, refine_steps=refine_steps, progress=progress, device=device)
    return new_config, convert_attention(
        config, state_dict, new_config, calibration, build, options=options, sink=sink
    )


def to_mqa(config: ModelConfig, state_dict: StateDict, calibration: torch.Tensor | None = None, **options):
    """:func:`to_gqa` with a single K/V head."""
    return to_gqa(config, state_dict, calibration, n_kv_heads=1, **options)


def _aligned_layer(config: ModelConfig, new_config: ModelConfig, ctx: LayerContext) -> torch.nn.Module:
    attn = ctx.source
    n_heads, head_dim, bias = config.n_heads, config.head_dim, config.attention_bias
    whitening, source_whitening, cross = layer_whitening(ctx, bias, config.d_model)
    targets = head_targets(attn, whitening, source_whitening, cross)
    # q/k norm (Qwen3): normalised heads, aligned by signs only - the one map the norm lets through
    cost, merge_keys_of = group_cost, merge_keys
    if config.qk_norm:
        targets, cost, merge_keys_of = normalised_targets(targets, attn), signed_group_cost, merge_signed
    size = n_heads // new_config.layers[ctx.index].n_kv_heads
    totals = (targets.key_energy(range(n_heads)), float(targets.value_gram(range(n_heads)).trace()))
    groups = best_partition(n_heads, size, lambda g: cost(targets, g, head_dim, totals))

    q_rows, k_rows, v_rows, o_cols = [], [], [], []
    q_source = rows_with_bias(attn.q_proj)
    o_blocks = attn.o_proj.weight.to(torch.float64).reshape(-1, n_heads, head_dim)
    for group in groups:
        key, alpha, _ = merge_keys_of(targets, group)
        value, _ = merge_values(targets, group, head_dim)
        k_rows.append(from_pairs(whitening.rows_from_white(key).unsqueeze(0)))
        v_rows.append(whitening.rows_from_white(value))
        blocks = output_blocks(targets, group, value)
        for position, head in enumerate(group):
            rows = q_source[head * head_dim : (head + 1) * head_dim]
            q_rows.append(scale_pairs(rows, 1, alpha[position].conj().unsqueeze(0)))
            o_cols.append(o_blocks[:, head] @ blocks[position])
    weights = {
        **split_bias("q_proj", torch.cat(q_rows), bias),
        **split_bias("k_proj", torch.cat(k_rows), bias),
        **split_bias("v_proj", torch.cat(v_rows), bias),
        "o_proj.weight": torch.cat(o_cols, dim=1),
    }
    if config.o_proj_bias:
        weights["o_proj.bias"] = attn.o_proj.bias
    if config.qk_norm:  # the gains stay: every head's norm, and the merged key's, scale alike
        weights.update({"q_norm.weight": attn.q_norm.weight, "k_norm.weight": attn.k_norm.weight})
    return new_attention(new_config, ctx.index, weights)


# ------------------------------------------------------------------------------------------ mean
def _mean_pool_all(config: ModelConfig, state_dict: StateDict, n_kv_heads: int) -> StateDict:
    """Mean-pool the K/V of every layer ``state_dict`` holds (all of them, or one layer's part)."""
    out = copy_state_dict(state_dict)
    for index, spec in enumerate(config.layers):
        if spec.kv_from is not None:
            continue
        group = spec.n_kv_heads // n_kv_heads
        for name in ("k_proj", "v_proj"):
            for leaf in ("weight", "bias"):
                key = f"{attn_prefix(index)}{name}.{leaf}"
                if key in state_dict:
                    out[key] = _mean_pool(state_dict[key], spec.n_kv_heads, group)
    return out


def _mean_pool(tensor: torch.Tensor, n_heads: int, group: int) -> torch.Tensor:
    """Average consecutive groups of ``group`` heads of a (n_heads·head_dim, …) projection."""
    grouped = tensor.reshape(n_heads // group, group, tensor.shape[0] // n_heads, *tensor.shape[1:])
    return grouped.mean(dim=1).reshape(-1, *tensor.shape[1:])


# ---------------------------------------------------------------------------------------------- record
@dataclasses.dataclass(kw_only=True)
class MQAOptions(FittedOptions):
    method: Literal[METHODS] = option(
        "aligned",
        help="aligned: heads grouped by how well their keys/values merge, keys merged per rotary pair, "
        "values into their common subspace, o_proj refitted; mean: the GQA paper's mean-pooling",
    )


@dataclasses.dataclass(kw_only=True)
class GQAOptions(MQAOptions):
    n_kv_heads: int = option(help="K/V heads per layer (must divide the query heads)")


GQA = Transform(
    "gqa",
    to_gqa,
    GQAOptions,
    check=lambda config, o: gqa_config(config, n_kv_heads=o.n_kv_heads, method=o.method),
    summary="fewer K/V heads on every layer (MHA → GQA)",
    calibrates=("method", "aligned"),
)
MQA = Transform(
    "mqa",
    to_mqa,
    MQAOptions,
    check=lambda config, o: gqa_config(config, n_kv_heads=1, method=o.method),
    summary="one K/V head on every layer",
    calibrates=("method", "aligned"),
)
