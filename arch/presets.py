"""Named layer patterns built from one base config: the vocabulary of the ``kvforge forms`` table, the
benchmarks and the tests (``mha gqa mqa mla cla swa mix sinks chunked gta gla linear deltanet``). Each preset is a
pattern of ``LayerSpec`` s over the forms of :mod:`.forms`."""

from __future__ import annotations

import dataclasses

from .config import LayerSpec, ModelConfig

PRESETS = (
    "mha",
    "gqa",
    "mqa",
    "mla",
    "cla",
    "swa",
    "mix",
    "sinks",
    "chunked",
    "gta",
    "gla",
    "linear",
    "deltanet",
)


def with_form(
    base: ModelConfig,
    form: str,
    *,
    n_kv_heads: int | None = None,
    window: int | None = None,
    kv_lora_rank: int | None = None,
    rope_dims: int | None = None,
) -> ModelConfig:
    """``base`` with every layer turned into ``form``.

    - ``gqa``: ``n_kv_heads`` (default n_heads/4); ``mqa``: one KV head; ``mha``: n_heads.
    - ``mla``: latent ``kv_lora_rank`` (default 4·head_dim) + rotary ``rope_dims`` (default head_dim/2),
      DeepSeek-V3's proportions (512 + 64 for head_dim 128).
    - ``cla``: GQA where every odd layer reads the K/V of the layer before it (CLA-2).
    - ``swa``: GQA with 3 sliding-window layers for each global one (``window``, default max_seq_len/4).
    - ``mix``: MLA, a windowed GQA layer, a GQA layer sharing its K/V, an MLA layer sharing the first's.
    - ``sinks``: attention sinks on windowed GQA layers alternating with global MLA layers.
    - ``chunked``: Llama 4's pattern - 3 chunked local GQA layers (chunks of ``window``) per global
      NoPE layer.
    - ``gta``: grouped-tied attention (``n_kv_heads`` tied states): a global and a windowed layer,
      each followed by one that reads its cache.
    - ``gla``: grouped-latent attention, MLA's latent in 2 latent heads; a windowed layer with sinks.
    - ``linear``: LoLCATs-style hybrid - linear attention with a softmax window, plain linear
      attention, linear + window again, then one global GQA layer (3 constant-state : 1 global).
    - ``deltanet``: Kimi Linear's layout - 3 Gated DeltaNet layers (``n_kv_heads`` states) : 1 MLA.
    """
    if form not in PRESETS:
        raise ValueError(f"form={form!r}: allowed values are {list(PRESETS)}")
    head_dim = base.head_dim
    gqa_heads = n_kv_heads or max(1, base.n_heads // 4)
    window = window or max(1, base.max_seq_len // 4)
    mla_sizes = {
        "kv_lora_rank": kv_lora_rank or 4 * head_dim,
        "qk_rope_head_dim": rope_dims or max(2, head_dim // 2),
        "qk_nope_head_dim": head_dim,
        "v_head_dim": head_dim,
    }
    gqa = LayerSpec("gqa", gqa_heads)
    patterns = {
        "mha": [LayerSpec("gqa", base.n_heads)],
        "gqa": [gqa],
        "mqa": [LayerSpec("gqa", 1)],
        "mla": [LayerSpec("mla")],
        "cla": [gqa, LayerSpec("gqa", kv_from=-1)],
        "swa": [LayerSpec("gqa", gqa_heads, window)] * 3 + [gqa],
        "mix": [
            LayerSpec("mla"),
            LayerSpec("gqa", gqa_heads, window),
            LayerSpec("gqa", window=window, kv_from=-1),
            LayerSpec("mla", kv_from=-3),
        ],
        "sinks": [LayerSpec("gqa", gqa_heads, window, sinks=True), LayerSpec("mla", sinks=True)],
        "chunked": [LayerSpec("gqa", gqa_heads, chunk=window)] * 3
        + [LayerSpec("gqa", gqa_heads, rope=False)],
        "gta": [
            LayerSpec("gta", gqa_heads),
            LayerSpec("gta", kv_from=-1),
            LayerSpec("gta", gqa_heads, window),
            LayerSpec("gta", window=window, kv_from=-1),
        ],
        "gla": [
            LayerSpec("gla", n_latent_heads=2),
            LayerSpec("gla", window=window, n_latent_heads=2, sinks=True),
        ],
        "linear": [
            LayerSpec("linear", gqa_heads, window),
            LayerSpec("linear", gqa_heads),
            LayerSpec("linear", gqa_heads, window),
            gqa,
        ],
        "deltanet": [LayerSpec("deltanet", gqa_heads)] * 3 + [LayerSpec("mla")],
    }
    changes = {
        "pattern": patterns[form],
        "layers": None,
        "n_kv_heads": gqa_heads if form != "mha" else base.n_heads,
    }
    if form in ("mla", "mix", "sinks", "gla", "deltanet"):
        changes.update(mla_sizes)
    return dataclasses.replace(base, **changes)
