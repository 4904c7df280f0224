"""MHA/GQA → fewer K/V heads.

``method="mean"`` is the GQA paper's (Ainslie et al., 2023) mean-pooling of the K and V heads of
each group of consecutive heads: query head ``h`` then reads new K/V head ``h // (n_heads / n_kv_heads)``.
"""

from __future__ import annotations

import dataclasses

import torch

from kvforge.arch import ModelConfig

from .common import StateDict, attn_prefix, check_gqa_source, copy_state_dict, is_count

METHODS = ("mean",)


def to_gqa(
    config: ModelConfig,
    state_dict: StateDict,
    calibration: torch.Tensor | None = None,
    *,
    n_kv_heads: int,
    method: str = "mean",
) -> tuple[ModelConfig, StateDict]:
    check_gqa_source(config, "to_gqa")
    if method not in METHODS:
        raise ValueError(f"to_gqa: method={method!r}: allowed values are {list(METHODS)}")
    if not is_count(n_kv_heads) or n_kv_heads <= 0 or config.n_heads % n_kv_heads:
        allowed = [d for d in range(1, config.n_heads + 1) if config.n_heads % d == 0]
        raise ValueError(
            f"to_gqa: n_kv_heads={n_kv_heads!r} must divide n_heads={config.n_heads} (allowed: {allowed})"
        )
    out = copy_state_dict(state_dict)
    layers = []
    for index, spec in enumerate(config.layers):
        if spec.kv_from is None:
            if spec.n_kv_heads % n_kv_heads:
                raise ValueError(
                    f"to_gqa: layer {index} has n_kv_heads={spec.n_kv_heads}, which n_kv_heads={n_kv_heads} "
                    "does not divide; pooling needs whole groups of heads"
                )
            group = spec.n_kv_heads // n_kv_heads
            for name in ("k_proj", "v_proj"):
                for leaf in ("weight", "bias"):
                    key = f"{attn_prefix(index)}{name}.{leaf}"
                    if key in state_dict:
                        out[key] = _mean_pool(state_dict[key], spec.n_kv_heads, group)
        layers.append(dataclasses.replace(spec, n_kv_heads=n_kv_heads))
    return dataclasses.replace(config, n_kv_heads=n_kv_heads, layers=layers, pattern=None), out


def to_mqa(config: ModelConfig, state_dict: StateDict, calibration: torch.Tensor | None = None, **options):
    """:func:`to_gqa` with a single K/V head."""
    return to_gqa(config, state_dict, calibration, n_kv_heads=1, **options)


def _mean_pool(tensor: torch.Tensor, n_heads: int, group: int) -> torch.Tensor:
    """Average consecutive groups of ``group`` heads of a (n_heads·head_dim, …) projection."""
    grouped = tensor.reshape(n_heads // group, group, tensor.shape[0] // n_heads, *tensor.shape[1:])
    return grouped.mean(dim=1).reshape(-1, *tensor.shape[1:])
