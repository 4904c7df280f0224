"""Cross-layer attention (CLA, Brandon et al., 2024): layers share K/V in groups of ``factor``.

Groups are consecutive layers (the last one may be shorter when ``factor`` does not divide the
layer count). The first layer of each group keeps (or, with ``init="mean"``, averages) the K/V projections; the
others drop theirs and read its K/V (``kv_from``).
"""

from __future__ import annotations

import dataclasses

import torch

from kvforge.arch import ModelConfig

from .common import StateDict, attn_prefix, check_gqa_source, copy_state_dict, is_count

INITS = ("first", "mean")
KV_LEAVES = ("k_proj.weight", "k_proj.bias", "v_proj.weight", "v_proj.bias", "k_norm.weight")


def to_cla(
    config: ModelConfig,
    state_dict: StateDict,
    calibration: torch.Tensor | None = None,
    *,
    factor: int = 2,
    init: str = "first",
) -> tuple[ModelConfig, StateDict]:
    check_gqa_source(config, "to_cla")
    if not is_count(factor) or not 2 <= factor <= config.n_layers:
        raise ValueError(f"to_cla: factor={factor!r} must be in 2..n_layers={config.n_layers}")
    if init not in INITS:
        raise ValueError(f"to_cla: init={init!r}: allowed values are {list(INITS)}")
    out = copy_state_dict(state_dict)
    layers = [dataclasses.replace(spec) for spec in config.layers]
    for owner in range(0, config.n_layers, factor):
        group = range(owner, min(owner + factor, config.n_layers))
        if any(config.layers[i].kv_from is not None for i in group):
            raise ValueError(
                f"to_cla: layers {list(group)} already share K/V; apply to_cla to an unshared model"
            )
        heads = {config.layers[i].n_kv_heads for i in group}
        if len(heads) != 1:
            raise ValueError(f"to_cla: layers {list(group)} have different n_kv_heads {sorted(heads)}")
        for leaf in KV_LEAVES:
            keys = [f"{attn_prefix(i)}{leaf}" for i in group]
            if keys[0] not in state_dict:
                continue
            if init == "mean":
                out[keys[0]] = torch.stack([state_dict[k] for k in keys]).mean(0)
            for key in keys[1:]:
                out.pop(key, None)
        for member in group[1:]:
            layers[member] = dataclasses.replace(layers[member], kv_from=owner)
    return dataclasses.replace(config, layers=layers, pattern=None), out
