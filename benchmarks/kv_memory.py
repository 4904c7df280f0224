"""KV-cache bytes per token of every attention form, analytic at a Llama-2-7B-like width and
measured from an allocated cache of a small model, with the ratio to MHA.

    python -m benchmarks.kv_memory [--markdown]
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.common import print_table
from kvforge.arch import CausalLM, LayerSpec, ModelConfig, kv_bytes_per_token, kv_cache_bytes

GQA8 = LayerSpec("gqa", 8)


def llama2_7b_forms() -> dict[str, ModelConfig]:
    """Llama-2-7B width (32 layers, 32 heads × 128, d 4096) in each form."""
    base = dict(vocab_size=32000, d_model=4096, n_layers=32, n_heads=32, ffn_dim=11008, max_seq_len=131072)
    mla = dict(kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128)
    return {
        "MHA (32 kv heads)": ModelConfig(**base),
        "GQA-8": ModelConfig(**base, pattern=[GQA8]),
        "MQA": ModelConfig(**base, pattern=[LayerSpec("gqa", 1)]),
        "MLA 512+64": ModelConfig(**base, **mla, pattern=[LayerSpec("mla")]),
        "CLA-2 over GQA-8": ModelConfig(**base, pattern=[GQA8, LayerSpec("gqa", kv_from=-1)]),
        "SWA 4096, 1 global in 4 (GQA-8)": ModelConfig(
            **base, pattern=[LayerSpec("gqa", 8, 4096)] * 3 + [GQA8]
        ),
        "mix: MLA + SWA-4096 GQA-8 + shared": ModelConfig(
            **base,
            **mla,
            pattern=[
                LayerSpec("mla"),
                LayerSpec("gqa", 8, 4096),
                LayerSpec("gqa", window=4096, kv_from=-1),
                LayerSpec("mla", kv_from=-3),
            ],
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--contexts", type=int, nargs="+", default=[4096, 32768, 131072])
    parser.add_argument("--dtype", default="bf16")
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()

    forms = llama2_7b_forms()
    mha = forms["MHA (32 kv heads)"]
    columns = ["form (Llama-2-7B width, bf16)"] + [f"KiB/token @ {n // 1024}k" for n in args.contexts]
    columns += [f"vs MHA @ {args.contexts[-1] // 1024}k"]
    rows = []
    for name, config in forms.items():
        per_token = [kv_bytes_per_token(config, n, args.dtype) / 1024 for n in args.contexts]
        ratio = kv_bytes_per_token(config, args.contexts[-1], args.dtype) / kv_bytes_per_token(
            mha, args.contexts[-1], args.dtype
        )
        rows.append([name, *per_token, f"{ratio:.4f}"])
    print_table(
        "Analytic KV-cache bytes per token of context (all layers)", columns, rows, markdown=args.markdown
    )

    # Measured: allocate a real cache of a small model of each form at 4k context.
    small = dict(vocab_size=512, d_model=256, n_layers=8, n_heads=8, max_seq_len=4096)
    small_mla = dict(kv_lora_rank=128, qk_rope_head_dim=16, qk_nope_head_dim=32, v_head_dim=32)
    window = LayerSpec("gqa", 2, 1024)
    small_forms = {
        "MHA": ModelConfig(**small),
        "GQA-2": ModelConfig(**small, pattern=[LayerSpec("gqa", 2)]),
        "MQA": ModelConfig(**small, pattern=[LayerSpec("gqa", 1)]),
        "MLA 128+16": ModelConfig(**small, **small_mla, pattern=[LayerSpec("mla")]),
        "CLA-2 over GQA-2": ModelConfig(**small, pattern=[LayerSpec("gqa", 2), LayerSpec("gqa", kv_from=-1)]),
        "SWA 1024, 1 global in 4": ModelConfig(**small, pattern=[window] * 3 + [LayerSpec("gqa", 2)]),
    }
    dtype = torch.bfloat16
    measured_rows = []
    mha_bytes = None
    for name, config in small_forms.items():
        cache = CausalLM(config).new_cache(batch=1, max_len=4096, dtype=dtype)
        measured, analytic = cache.nbytes(), kv_cache_bytes(config, 4096, dtype)
        mha_bytes = mha_bytes or measured
        measured_rows.append(
            [
                name,
                f"{measured:,}",
                f"{analytic:,}",
                "yes" if measured == analytic else "NO",
                f"{measured / mha_bytes:.4f}",
            ]
        )
    columns = [
        "form (d 256, 8 layers, 8 heads × 32)",
        "measured bytes @ 4k",
        "analytic bytes",
        "equal",
        "vs MHA",
    ]
    print_table(
        "Measured: KVCache.nbytes() of an allocated bf16 cache, batch 1, 4096 tokens",
        columns,
        measured_rows,
        markdown=args.markdown,
    )


if __name__ == "__main__":
    main()
