"""Analytic KV-cache size from the config alone (DESIGN.md's table), independent of the cache code:
tests assert that :meth:`KVCache.nbytes` allocates exactly this many bytes.

| layer form    | values cached per token per layer          |
|---------------|--------------------------------------------|
| gqa, global   | 2 · n_kv_heads · head_dim                  |
| gqa, window W | the same, for at most W tokens             |
| chunk C       | the same, for at most C tokens             |
| mla           | kv_lora_rank + mla_rope_heads · rope dim   |
| gta           | n_kv_heads · head_dim + head_dim / 2       |
| gla           | as mla (the latent split in latent heads)  |
| kv_from       | 0 (reads its source layer's entry)         |
| linear        | 0; a fixed state per sequence (below)      |
| deltanet      | 0; a fixed state per sequence (below)      |

Constant-state layers keep a number of bytes per sequence that does not depend on the context
(:func:`layer_state_bytes`): float32 sums/states plus a few cache-dtype positions (a linear layer's
window of ``W - 1`` keys and values, a deltanet layer's convolution inputs). ``kv_cache_bytes`` counts
them too, so it stays what a cache for that context allocates.
"""

from __future__ import annotations

import dataclasses

import torch

from .attention_deltanet import deltanet_state_values
from .attention_linear import linear_state_values
from .config import STATE_FORMS, LayerSpec, ModelConfig

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
    if spec.kv_from is not None or spec.attention in STATE_FORMS:
        return 0
    if spec.attention in ("mla", "gla"):
        return config.kv_lora_rank + config.mla_rope_heads * config.qk_rope_head_dim
    if spec.attention == "gta":  # tied K/V states + one shared rotary key of half a head
        return spec.n_kv_heads * config.head_dim + config.head_dim // 2
    return 2 * spec.n_kv_heads * config.head_dim


STATE_VALUES = {"linear": linear_state_values, "deltanet": deltanet_state_values}


def layer_state_bytes(config: ModelConfig, spec: LayerSpec, dtype: torch.dtype | str = "bf16") -> int:
    """Bytes a constant-state layer keeps per sequence, whatever the context (0 for other layers):
    float32 sums/states plus positions held in the cache ``dtype``."""
    if spec.attention not in STATE_VALUES:
        return 0
    float32_values, cached_values = STATE_VALUES[spec.attention](config, spec)
    return 4 * float32_values + parse_dtype(dtype).itemsize * cached_values


def state_bytes(config: ModelConfig, dtype: torch.dtype | str = "bf16", batch: int = 1) -> int:
    """Bytes of every constant-state layer's state for ``batch`` sequences (any context length)."""
    return batch * sum(layer_state_bytes(config, spec, dtype) for spec in config.layers)


def layer_cached_tokens(spec: LayerSpec, seq_len: int) -> int:
    span = spec.window if spec.window is not None else spec.chunk
    return min(seq_len, span) if span is not None else seq_len


def kv_cache_bytes(
    config: ModelConfig, seq_len: int, dtype: torch.dtype | str = "bf16", batch: int = 1
) -> int:
    """Bytes of a cache holding ``batch`` sequences of ``seq_len`` tokens (constant states included)."""
    if seq_len <= 0 or batch <= 0:
        raise ValueError(f"kv_cache_bytes: seq_len={seq_len} and batch={batch} must be positive")
    item = parse_dtype(dtype).itemsize
    return state_bytes(config, dtype, batch) + (
        batch
        * item
        * sum(
            layer_kv_values_per_token(config, spec) * layer_cached_tokens(spec, seq_len)
            for spec in config.layers
        )
    )


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
    """One row per layer: form, window, source, values/token, the constant state's bytes and all bytes at
    ``seq_len``."""
    item = parse_dtype(dtype).itemsize
    rows = []
    for index, spec in enumerate(config.layers):
        values = layer_kv_values_per_token(config, spec)
        state = layer_state_bytes(config, spec, dtype)
        form = {
            "mla": "mla",
            "gta": f"gta-{spec.n_kv_heads}",
            "gla": f"gla-{spec.n_latent_heads}",
            "linear": "linear",
            "deltanet": f"deltanet-{spec.n_kv_heads}",
        }.get(spec.attention, _gqa_name(config.n_heads, spec.n_kv_heads))
        rows.append(
            {
                "layer": index,
                "form": form,
                "window": spec.window,
                "kv_from": spec.kv_from,
                "values_per_token": values,
                "state_bytes": state,
                "bytes": values * layer_cached_tokens(spec, seq_len) * item + state,
            }
        )
    return rows


def _gqa_name(n_heads: int, n_kv_heads: int) -> str:
    if n_kv_heads == n_heads:
        return "mha"
    if n_kv_heads == 1:
        return "mqa"
    return f"gqa-{n_kv_heads}"
