"""Analytic KV-cache size from the config alone (the README's table), independent of the cache code:
tests assert that :meth:`KVCache.nbytes` allocates exactly this many bytes.

Each form declares the values one token adds to a layer's cache (``kv_values_per_token`` of its
record in :mod:`.forms`) and any per-sequence state (``state_bytes_per_sequence``):

| layer form    | values cached per token per layer          |
|---------------|--------------------------------------------|
| gqa, global   | 2 · n_kv_heads · head_dim                  |
| gqa, window W | the same, for at most W tokens             |
| chunk C       | the same, for at most C tokens             |
| mla           | kv_lora_rank + mla_rope_heads · rope dim   |
| gta           | n_kv_heads · head_dim + head_dim / 2       |
| gla           | as mla (the latent split in latent heads)  |
| kv_from       | 0 (reads its source layer's entry)         |
| linear        | 0: a fixed state per sequence              |
| deltanet      | 0: a fixed state per sequence              |

A constant-state layer (linear, deltanet) keeps a number of bytes per sequence whatever the context:
float32 sums/states plus a few positions in the cache dtype (a linear layer's last ``W - 1`` keys and
values, a deltanet layer's convolution inputs). ``kv_cache_bytes`` counts them, so it stays what a
cache for that context allocates; :func:`state_bytes` gives them alone.
"""

from __future__ import annotations

import dataclasses

import torch

from .config import LayerSpec, ModelConfig
from .forms import form_of

DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "fp8": torch.float8_e4m3fn,
    "float8_e4m3fn": torch.float8_e4m3fn,
}


def parse_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}: allowed values are {sorted(DTYPES)}")
    return DTYPES[dtype]


def layer_kv_values_per_token(config: ModelConfig, spec: LayerSpec) -> int:
    """Values one token adds to this layer's cache (0 for a layer that reads another's K/V)."""
    if spec.kv_from is not None:
        return 0
    return form_of(spec).kv_values_per_token(config, spec)


def layer_state_bytes(config: ModelConfig, spec: LayerSpec, itemsize: int) -> int:
    """Bytes a layer keeps per sequence whatever its length (0 for a K/V cache or a shared layer)."""
    if spec.kv_from is not None:
        return 0
    return form_of(spec).state_bytes_per_sequence(config, spec, itemsize)


def state_bytes(config: ModelConfig, dtype: torch.dtype | str = "bf16", batch: int = 1) -> int:
    """Bytes of every layer's fixed per-sequence state for ``batch`` sequences (any context length)."""
    item = parse_dtype(dtype).itemsize
    return batch * sum(layer_state_bytes(config, spec, item) for spec in config.layers)


def layer_cached_tokens(spec: LayerSpec, seq_len: int) -> int:
    span = spec.window if spec.window is not None else spec.chunk
    return min(seq_len, span) if span is not None else seq_len


def kv_cache_bytes(
    config: ModelConfig, seq_len: int, dtype: torch.dtype | str = "bf16", batch: int = 1
) -> int:
    """Bytes of a cache holding ``batch`` sequences of ``seq_len`` tokens."""
    if seq_len <= 0 or batch <= 0:
        raise ValueError(f"kv_cache_bytes: seq_len={seq_len} and batch={batch} must be positive")
    item = parse_dtype(dtype).itemsize
    per_token = item * sum(
        layer_kv_values_per_token(config, spec) * layer_cached_tokens(spec, seq_len) for spec in config.layers
    )
    return batch * (per_token + sum(layer_state_bytes(config, spec, item) for spec in config.layers))


def kv_bytes_per_token(config: ModelConfig, seq_len: int, dtype: torch.dtype | str = "bf16") -> float:
    """Cache bytes per token of context, averaged over a ``seq_len``-token sequence (all layers)."""
    return kv_cache_bytes(config, seq_len, dtype) / seq_len


def mha_equivalent(config: ModelConfig) -> ModelConfig:
    """The same width as plain multi-head attention on every layer: the baseline of KV-savings ratios."""
    return dataclasses.replace(
        config,
        n_kv_heads=config.n_heads,
        pattern=None,
        layers=[LayerSpec("gqa", config.n_heads) for _ in range(config.n_layers)],
    )


def describe_layers(config: ModelConfig, seq_len: int, dtype: torch.dtype | str = "bf16") -> list[dict]:
    """One row per layer: form, window, source, values/token, fixed state bytes and all bytes at ``seq_len``."""
    item = parse_dtype(dtype).itemsize
    rows = []
    for index, spec in enumerate(config.layers):
        values = layer_kv_values_per_token(config, spec)
        state = layer_state_bytes(config, spec, item)
        rows.append(
            {
                "layer": index,
                "form": form_of(spec).label(config, spec),
                "window": spec.window,
                "kv_from": spec.kv_from,
                "values_per_token": values,
                "bytes": values * layer_cached_tokens(spec, seq_len) * item + state,
                "state_bytes": state,
            }
        )
    return rows
