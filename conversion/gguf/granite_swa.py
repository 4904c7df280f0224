"""Reading kvforge's ``granite_swa`` files back: Llama's recipe with per-layer sliding windows and
attention sinks (:data:`.architectures.GRANITE_SWA`), which transformers' GGUF reader cannot read.
The Llama config comes from the metadata (tensors are Llama's, Q/K rows in rotary pairs, undone by
transformers' Llama tensor processor); the windows from ``sliding_window``/``sliding_window_pattern``;
a layer has sinks unless its ``attn_sinks`` are all the "no sink" logit kvforge writes.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from gguf import GGUFReader

from .architectures import NO_SINK

ARCH = "granite_swa"


def granite_swa_config(reader: GGUFReader, field) -> object:
    from transformers import LlamaConfig

    def key(name: str, default: object = ...) -> object:
        return field(reader, f"{ARCH}.{name}", default)

    if float(key("logit_scale", 1.0)) != 1.0 or key("residual_scale", None) or key("embedding_scale", None):
        raise ValueError(
            f"{reader.data.filename}: a Granite model with its own scales; kvforge reads Llama-recipe ones"
        )
    heads = int(key("attention.head_count"))
    tokens = field(reader, "tokenizer.ggml.tokens", None)
    return LlamaConfig(
        vocab_size=int(key("vocab_size", None) or len(tokens)),
        hidden_size=int(key("embedding_length")),
        intermediate_size=int(key("feed_forward_length")),
        num_hidden_layers=int(key("block_count")),
        num_attention_heads=heads,
        num_key_value_heads=int(key("attention.head_count_kv", heads)),
        head_dim=int(key("attention.key_length")),
        max_position_embeddings=int(key("context_length")),
        rms_norm_eps=float(str(np.float32(key("attention.layer_norm_rms_epsilon")))),
        rope_theta=float(str(np.float32(key("rope.freq_base", 10000.0)))),
        attention_bias=any(t.name.endswith(".attn_q.bias") for t in reader.tensors),
        tie_word_embeddings=all(t.name != "output.weight" for t in reader.tensors),
        bos_token_id=field(reader, "tokenizer.ggml.bos_token_id", None),
        eos_token_id=field(reader, "tokenizer.ggml.eos_token_id", None),
        pad_token_id=None,
    )


def sink_layers(reader: GGUFReader) -> dict[str, int]:
    """``blk.N.attn_sinks.weight`` -> N for the layers with real sinks (not all NO_SINK)."""
    found = {}
    for tensor in reader.tensors:
        if tensor.name.endswith(".attn_sinks.weight") and not np.all(
            np.asarray(tensor.data) == np.float32(NO_SINK)
        ):
            found[tensor.name] = int(tensor.name.split(".")[1])
    return found


def with_windows_and_sinks(config, reader: GGUFReader, field):
    """``config`` (Llama, global) with the file's per-layer windows, sinks and o_proj bias."""
    window = field(reader, f"{ARCH}.attention.sliding_window", None)
    pattern = field(reader, f"{ARCH}.attention.sliding_window_pattern", None) or []
    sinks = set(sink_layers(reader).values())
    layers = [
        dataclasses.replace(
            spec,
            window=int(window) if index < len(pattern) and pattern[index] else None,
            sinks=index in sinks,
        )
        for index, spec in enumerate(config.layers)
    ]
    # Llama ties the o_proj bias to the q/k/v ones; the file says which it has (Qwen2's: q/k/v only)
    o_proj_bias = any(t.name.endswith(".attn_output.bias") for t in reader.tensors)
    return dataclasses.replace(config, layers=layers, pattern=None, o_proj_bias=o_proj_bias)
