"""Cross-layer attention (CLA, Brandon et al., 2024): layers share K/V in groups of ``factor``.

Groups are consecutive layers from ``offset`` on (layers before ``offset`` keep their own K/V; the
last group may be shorter). The first layer of a group (the owner) computes and caches K/V; the
others drop ``k_proj``/``v_proj`` and attend over the owner's (``kv_from``). Initialisations:

- ``first``: the owner keeps its projections (the others' queries read them as they are);
- ``mean``: the owner's projections become the group's average;
- ``fit`` (default): the shared K/V are fitted to what *every* layer of the group read, from the
  owner's input. Each member's K/V heads are regressed onto the owner's calibration inputs, matched
  to the owner's heads (the matching with the lowest merge cost; a member's query heads are
  permuted to follow), and merged as in :mod:`.merge` (per-pair complex key scales folded into each
  layer's queries, value maps into each layer's ``o_proj``); then every layer's ``o_proj`` is
  refitted against its source block on the shared K/V (:mod:`.layerwise`). Without calibration the
  same merge runs on the weights alone.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Literal

import torch

from kvforge.arch import ModelConfig

from .calibration import check_calibration
from .common import Sink, StateDict, attn_prefix, check_gqa_source, copy_state_dict, is_count, map_layers
from .key_metric import value_metric
from .layerwise import FitOptions, LayerContext, convert_attention, new_attention
from .merge import HeadTargets, group_cost, merge_group, output_blocks
from .record import FittedOptions, Transform, option
from .rotary import from_pairs, pair_frequencies, scale_pairs
from .whitening import Whitening, flat_inputs, head_targets, rows_with_bias, split_bias

INITS = ("fit", "first", "mean")
KV_LEAVES = ("k_proj.weight", "k_proj.bias", "v_proj.weight", "v_proj.bias", "k_norm.weight")


def cla_layout(
    config: ModelConfig, *, factor: int = 2, init: str = "fit", offset: int = 0
) -> tuple[ModelConfig, list[list[int]]]:
    """The target config of :func:`to_cla` and its groups of layers (validates the options)."""
    check_gqa_source(config, "to_cla")
    if not is_count(factor) or not 2 <= factor <= config.n_layers:
        raise ValueError(f"to_cla: factor={factor!r} must be in 2..n_layers={config.n_layers}")
    if init not in INITS:
        raise ValueError(f"to_cla: init={init!r}: allowed values are {list(INITS)}")
    if not is_count(offset) or not 0 <= offset <= config.n_layers - 2:
        raise ValueError(f"to_cla: offset={offset} must be in 0..n_layers-2={config.n_layers - 2}")
    groups = [[index] for index in range(offset)] + [
        list(range(start, min(start + factor, config.n_layers)))
        for start in range(offset, config.n_layers, factor)
    ]
    layers = [dataclasses.replace(spec) for spec in config.layers]
    for group in groups:
        if any(config.layers[i].kv_from is not None for i in group):
            raise ValueError(f"to_cla: layers {group} already share K/V; apply to_cla to an unshared model")
        for attribute in ("n_kv_heads", "window"):
            values = {getattr(config.layers[i], attribute) for i in group}
            if len(values) != 1:
                raise ValueError(
                    f"to_cla: layers {group} have different {attribute} {sorted(values, key=str)}: layers "
                    f"sharing one K/V cache need the same {attribute}, which no init changes (allowed: a "
                    "factor/offset whose groups each have one)"
                )
        for member in group[1:]:
            layers[member] = dataclasses.replace(layers[member], kv_from=group[0], n_kv_heads=None)
    # after the layout checks: no init can pair layers of different windows, so that refusal comes first
    if init == "fit" and config.qk_norm:
        raise ValueError(
            "to_cla: init='fit' needs keys that are linear in the input; with qk_norm use init='first'"
        )
    return dataclasses.replace(config, layers=layers, pattern=None), groups


def to_cla(
    config: ModelConfig,
    state_dict: StateDict,
    calibration: torch.Tensor | None = None,
    *,
    factor: int = 2,
    init: str = "fit",
    offset: int = 0,
    sequential: bool = False,
    refine_steps: int = 0,
    progress: bool = False,
    device: str | torch.device = "cpu",
    sink: Sink | None = None,
) -> tuple[ModelConfig, StateDict]:
    """``device`` and ``sink`` as in :func:`~.gqa.to_gqa`."""
    new_config, groups = cla_layout(config, factor=factor, init=init, offset=offset)
    if init != "fit":
        return new_config, map_layers(
            new_config, state_dict, groups, lambda part: _copy_or_average(config, part, groups, init), sink
        )
    calibration = check_calibration(calibration, config, "to_cla")

    def build(contexts: list[LayerContext]) -> list[torch.nn.Module]:
        if len(contexts) == 1:  # a layer that keeps its own K/V
            weights = dict(contexts[0].source.state_dict())
            return [new_attention(new_config, contexts[0].index, weights)]
        return _fit_group(config, new_config, contexts)

    options = FitOptions(sequential=sequential, refine_steps=refine_steps, progress=progress, device=device)
    return new_config, convert_attention(
        config, state_dict, new_config, calibration, build, groups, options, sink=sink
    )


def _copy_or_average(
    config: ModelConfig, state_dict: StateDict, groups: list[list[int]], init: str
) -> StateDict:
    out = copy_state_dict(state_dict)
    for group in groups:
        for leaf in KV_LEAVES:
            keys = [f"{attn_prefix(i)}{leaf}" for i in group]
            if keys[0] not in state_dict:
                continue
            if init == "mean":
                out[keys[0]] = torch.stack([state_dict[k] for k in keys]).mean(0)
            for key in keys[1:]:
                out.pop(key, None)
    return out


def _fit_group(
    config: ModelConfig, new_config: ModelConfig, contexts: list[LayerContext]
) -> list[torch.nn.Module]:
    owner = contexts[0]
    n_heads, head_dim, bias = config.n_heads, config.head_dim, config.attention_bias
    rep = n_heads // owner.source.n_kv_heads
    if owner.inputs is None:
        whitening = Whitening.identity(config.d_model + bias)
        per_layer = [head_targets(ctx.source, whitening, whitening, None) for ctx in contexts]
    else:
        owner_x = flat_inputs(owner.inputs, bias)
        whitening = Whitening.from_gram(owner_x.mT @ owner_x / len(owner_x))
        per_layer = []
        for ctx in contexts:
            source_x = flat_inputs(ctx.source_inputs, bias)
            source_whitening = Whitening.from_gram(source_x.mT @ source_x / len(source_x))
            cross = owner_x.mT @ source_x / len(owner_x)
            per_layer.append(head_targets(ctx.source, whitening, source_whitening, cross))
    targets = _concat(per_layer)
    metric = None  # values merged in the metric their errors reach each layer's output in (.key_metric)
    if owner.inputs is not None:
        sources = [(ctx.source, ctx.source_inputs) for ctx in contexts]
        metric = value_metric(sources, owner.inputs, whitening, pair_frequencies(config), bias)
        targets = dataclasses.replace(targets, value=targets.value @ metric[0])
    everyone = range(len(contexts) * n_heads)
    totals = (targets.key_energy(everyone), float(targets.value_gram(everyone).trace()))

    def cost(heads: list[int]) -> float:
        return group_cost(targets, heads, head_dim, totals)

    # kv_groups[g]: the query heads (indices into `targets`) that read new K/V head g.
    n_kv = n_heads // rep
    kv_groups = [list(range(g * rep, (g + 1) * rep)) for g in range(n_kv)]
    orders = [list(range(n_heads))]
    for position in range(1, len(contexts)):
        base = position * n_heads
        member_groups = [[base + h for h in range(g * rep, (g + 1) * rep)] for g in range(n_kv)]
        match = min(
            itertools.permutations(range(n_kv)),
            key=lambda perm: sum(cost(kv_groups[g] + member_groups[perm[g]]) for g in range(n_kv)),
        )
        kv_groups = [kv_groups[g] + member_groups[match[g]] for g in range(n_kv)]
        orders.append([h - base for g in range(n_kv) for h in member_groups[match[g]]])

    merged = [merge_group(targets, heads, head_dim) for heads in kv_groups]
    alpha, blocks = {}, {}
    for heads, group in zip(kv_groups, merged):
        for position, (head, out) in enumerate(zip(heads, output_blocks(targets, heads, group.value))):
            alpha[head], blocks[head] = group.alpha[position], out
    if metric is not None:  # back from the metric's coordinates to the whitened ones
        merged = [dataclasses.replace(group, value=group.value @ metric[1]) for group in merged]
    modules = []
    for position, (ctx, order) in enumerate(zip(contexts, orders)):
        q_source = rows_with_bias(ctx.source.q_proj)
        o_source = ctx.source.o_proj.weight.to(torch.float64).reshape(-1, n_heads, head_dim)
        q_rows, o_cols = [], []
        for head in order:
            index = position * n_heads + head
            rows = q_source[head * head_dim : (head + 1) * head_dim]
            q_rows.append(scale_pairs(rows, 1, alpha[index].conj().unsqueeze(0)))
            o_cols.append(o_source[:, head] @ blocks[index])
        weights = {**split_bias("q_proj", torch.cat(q_rows), bias), "o_proj.weight": torch.cat(o_cols, dim=1)}
        if position == 0:
            weights.update(split_bias("k_proj", torch.cat([_key_rows(whitening, g) for g in merged]), bias))
            weights.update(
                split_bias("v_proj", torch.cat([whitening.rows_from_white(g.value) for g in merged]), bias)
            )
        modules.append(new_attention(new_config, ctx.index, weights))
    return modules


def _key_rows(whitening: Whitening, merged) -> torch.Tensor:
    return from_pairs(whitening.rows_from_white(merged.key).unsqueeze(0))


def _concat(parts: list[HeadTargets]) -> HeadTargets:
    return HeadTargets(
        *(torch.cat([getattr(p, f.name) for p in parts]) for f in dataclasses.fields(HeadTargets))
    )


# ---------------------------------------------------------------------------------------------- record
@dataclasses.dataclass(kw_only=True)
class CLAOptions(FittedOptions):
    """Cross-layer attention: groups of adjacent layers share one K/V."""

    factor: int = option(2, help="layers per group sharing one K/V")
    init: Literal[INITS] = option(
        "fit",
        help="fit: shared K/V fitted to every layer of the group; first: the first layer's; mean: average",
    )
    offset: int = option(0, help="layers before this one keep their own K/V")


CLA = Transform("cla", to_cla, CLAOptions, cla_layout, calibrates=("init", "fit"))
