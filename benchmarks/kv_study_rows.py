"""The rows of the KV study (``benchmarks/kv_study.py``): how each attention form is built from the
MHA source, as the ``model.convert`` steps ``train.py`` and ``KVForgeLM`` take, and TARGETS.md's
recovery targets."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Row:
    built_by: str
    convert: tuple[dict, ...]  # model.convert steps, applied in order; () = the source itself
    uptrain: bool = True


def _gqa(n_kv_heads: int, method: str = "aligned") -> dict:
    return {"to": "gqa", "n_kv_heads": n_kv_heads, "method": method}


# In the order the default run measures them: the rows with TARGETS.md targets first.
ROWS: dict[str, Row] = {
    "mha": Row("source (8 KV heads)", (), uptrain=False),
    "gqa-2": Row("to_gqa aligned, 2 KV heads", (_gqa(2),)),
    # A shared rotary key over the whole head_dim (8) and a smaller latent zero-shot beat latent 30 + one
    # rotary pair (1.85 vs 4.25) and latent 14 + one pair (2.92 vs 4.28) at equal bytes.
    "mla-1/4": Row("to_mla latent 24 + rope 8", ({"to": "mla", "kv_lora_rank": 24, "rope_dims": 8},)),
    "cla-2": Row("to_gqa 4 heads + to_cla 2 (fit)", (_gqa(4), {"to": "cla", "factor": 2, "init": "fit"})),
    "mqa": Row("to_gqa aligned, 1 KV head", (_gqa(1),)),
    "mla-1/8": Row("to_mla latent 8 + rope 8", ({"to": "mla", "kv_lora_rank": 8, "rope_dims": 8},)),
    "swa-hybrid": Row(
        "window 64 on layers 0-3, layer 4 global", ({"to": "window", "windows": [64] * 4 + [None]},)
    ),
    "gqa-4": Row("mean-pool to 4 KV heads (exact)", (_gqa(4, "mean"),), uptrain=False),
    "swa-64": Row("window 64 on every layer", ({"to": "window", "windows": 64},), uptrain=False),
    # Not in the default run (--rows adds them): TARGETS.md's mean-pool baseline re-measured, and the
    # source itself through the same budget (the budget also adapts it to this text's formatting).
    "gqa-2-mean": Row("mean-pool to 2 KV heads (TARGETS baseline)", (_gqa(2, "mean"),)),
    "mha-control": Row("source, uptrained as the control", ()),
    # Issue 19's forms (only with --rows, see NEW_FORM_ROWS): sinks on sliding windows, Llama 4's
    # chunked local + NoPE global layers, GTA next to GQA-2 and GLA next to MLA at (about) equal bytes.
    "swa-32": Row("window 32 on every layer", ({"to": "window", "windows": 32},)),
    "swa-32-sinks": Row(
        "window 32 + attention sinks (fitted)", ({"to": "window", "windows": 32, "sinks": True},)
    ),
    "swa-64-trained": Row("window 64 on every layer", ({"to": "window", "windows": 64},)),
    "swa-64-sinks": Row(
        "window 64 + attention sinks (fitted)", ({"to": "window", "windows": 64, "sinks": True},)
    ),
    "chunked-nope": Row(
        "chunks of 64 on layers 0-3, layer 4 global NoPE",
        ({"to": "chunked", "chunk": 64, "global_every": 5},),
    ),
    "gta-4": Row("mean-pool to 4 KV heads (exact), to_gta: 4 tied states", (_gqa(4, "mean"), {"to": "gta"})),
    "gla-2": Row(
        "to_mla latent 24 + rope 8, to_gla 2 latent heads",
        ({"to": "mla", "kv_lora_rank": 24, "rope_dims": 8}, {"to": "gla", "n_latent_heads": 2}),
    ),
}
# Issue 29's constant-state hybrids (only with --rows, see STATE_ROWS): r converted : 1 kept is
# n_layers // (r + 1) softmax layers kept, so on 5 layers 1:1 keeps 2, 3:1 keeps 1 and 7:1 none. Kept
# layers are the first and last ones (keep=ends: the best measured default, docs/transforms.md).
for _form in ("linear", "deltanet"):
    for _ratio in (1, 3, 7):
        ROWS[f"{_form}-{_ratio}:1"] = Row(
            f"to_{_form}, {_ratio} converted : 1 kept (ends), attention transfer",
            ({"to": _form, "ratio": _ratio, "keep": "ends"},),
        )
STATE_ROWS = tuple(f"{form}-{ratio}:1" for form in ("linear", "deltanet") for ratio in (1, 3, 7))
NEW_FORM_ROWS = ("swa-32", "swa-32-sinks", "swa-64-trained", "swa-64-sinks", "chunked-nope", "gta-4", "gla-2")
DEFAULT_ROWS = [
    name for name in ROWS if name not in ("gqa-2-mean", "mha-control", *NEW_FORM_ROWS, *STATE_ROWS)
]
# TARGETS.md "Uptraining recovery": the largest allowed held-out loss increase over the source, in %.
TARGET_INCREASE_PERCENT = {"gqa-2": 1.0, "mla-1/4": 2.0, "cla-2": 3.0}
