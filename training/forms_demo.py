"""Build a small model of every attention form, run a forward/backward and a cached generation,
and print parameters and KV-cache bytes per token (analytic = measured) next to MHA.

    kvforge forms [--d-model 256 --layers 8 --heads 8 --seq-len 4096 --dtype bf16]
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--layers", type=int, default=8, help="a multiple of 4 (the swa and mix patterns)")
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=512)
    parser.add_argument("--seq-len", type=int, default=4096, help="context length for the KV bytes figures")
    parser.add_argument("--window", type=int, default=1024, help="sliding window of the swa/mix forms")
    parser.add_argument("--dtype", default="bf16", help="cache dtype for the byte counts (bf16, fp16, fp32)")


def run(args: argparse.Namespace) -> int:
    import time

    import torch
    from rich.console import Console
    from rich.table import Table

    from kvforge.arch import CausalLM, ModelConfig, generate, kv_bytes_per_token, kv_cache_bytes, parse_dtype
    from kvforge.arch.presets import PRESETS, with_form

    torch.manual_seed(0)
    dtype = parse_dtype(args.dtype)
    base = ModelConfig(
        vocab_size=args.vocab,
        d_model=args.d_model,
        n_layers=args.layers,
        n_heads=args.heads,
        max_seq_len=args.seq_len,
    )
    table = Table(
        title=f"Attention forms at d_model={args.d_model}, {args.layers} layers, {args.seq_len}-token context, {args.dtype} cache"
    )
    for column in (
        "form",
        "params",
        "KV bytes/token",
        "vs MHA",
        "cache bytes (measured)",
        "fwd+bwd loss",
        "decode tok/s",
    ):
        table.add_column(column, justify="left" if column == "form" else "right")
    mha_bytes = kv_bytes_per_token(with_form(base, "mha"), args.seq_len, dtype)
    for form in PRESETS:
        config = with_form(base, form, window=args.window)
        model = CausalLM(config)
        ids = torch.randint(0, args.vocab, (2, 65))
        loss = model.loss(ids[:, :-1], ids[:, 1:])
        loss.backward()
        model.eval()
        start = time.perf_counter()
        out = generate(model, ids[:1, :8], 32)
        tok_s = 32 / (time.perf_counter() - start)
        assert out.shape == (1, 40)
        cache = model.new_cache(1, args.seq_len, dtype=dtype)
        analytic = kv_cache_bytes(config, args.seq_len, dtype)
        if cache.nbytes() != analytic:
            raise RuntimeError(f"{form}: cache allocates {cache.nbytes()} bytes, formula says {analytic}")
        per_token = kv_bytes_per_token(config, args.seq_len, dtype)
        table.add_row(
            form,
            f"{model.num_parameters():,}",
            f"{per_token:,.0f}",
            f"{per_token / mha_bytes:.3f}",
            f"{cache.nbytes():,}",
            f"{loss.item():.3f}",
            f"{tok_s:,.0f}",
        )
    Console().print(table)
    return 0
