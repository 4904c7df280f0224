"""Decode speed and cache memory versus context length on the CPU: constant-state hybrids against GQA and
MLA (issue 29). A fixed state stays flat while a K/V cache grows with every token.

    python -m benchmarks.state_decode [--contexts 512,2048,8192] [--plot docs/results/state_decode.png] [--markdown]

Every model has the same width (d_model 256, 8 layers, 8 query heads of 32 dims, random weights: speed and
bytes do not depend on the values) and differs only in its layers:

| model             | layers                                                                 |
|-------------------|------------------------------------------------------------------------|
| gqa-2 (baseline)  | GQA with 2 K/V heads on every layer                                    |
| mla               | MLA, latent 128 + rotary key 16 (DeepSeek-V3's proportions)            |
| deltanet 3:1      | Gated DeltaNet (2 states) on 3 of every 4 layers, GQA-2 on the 4th     |
| linear+w64 3:1    | linear attention + a 64-token softmax window on 3 of 4, GQA-2 on the 4th |
| deltanet          | Gated DeltaNet on every layer                                          |

Measured with :func:`kvforge.evaluation.measure_decode` (batch 1, a prompt of ``context - 16``
tokens, then 16 single-token decode steps, medians of ``--repeats``): the cache bytes measured from the
tensors (= the analytic figure) and decode tokens/s, with the ratio to GQA-2 at the same context
measured in the same run. The decode kernels are the pure-PyTorch reference (no fla, no Triton): the
per-token work of a state layer is constant, that of attention grows with the context.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from benchmarks.common import print_table
from kvforge.arch import CausalLM, LayerSpec, ModelConfig
from kvforge.evaluation import measure_decode

BASE = {"vocab_size": 512, "d_model": 256, "n_layers": 8, "n_heads": 8, "head_dim": 32, "n_kv_heads": 2}
MLA = {"kv_lora_rank": 128, "qk_rope_head_dim": 16, "qk_nope_head_dim": 32, "v_head_dim": 32}
MODELS = {
    "gqa-2": [LayerSpec("gqa")],
    "mla": [LayerSpec("mla")],
    "deltanet 3:1": [LayerSpec("deltanet")] * 3 + [LayerSpec("gqa")],
    "linear+w64 3:1": [LayerSpec("linear", window=64)] * 3 + [LayerSpec("gqa")],
    "deltanet": [LayerSpec("deltanet")],
}


def model_config(name: str, max_seq_len: int) -> ModelConfig:
    extra = MLA if name == "mla" else {}
    return ModelConfig(**BASE, **extra, max_seq_len=max_seq_len, pattern=MODELS[name])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--contexts", default="512,2048,8192", help="comma-separated context lengths")
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of {list(MODELS)}")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: the cores are shared)")
    parser.add_argument("--plot", type=Path, help="write bytes and tokens/s versus context to this PNG")
    parser.add_argument("--markdown", action="store_true")
    return parser.parse_args(argv)


def measure(names: list[str], contexts: list[int], repeats: int) -> dict[str, list[tuple[int, int, float]]]:
    """``{model: [(context, measured cache bytes, decode tokens/s)]}``."""
    results = {}
    for name in names:
        torch.manual_seed(0)
        model = CausalLM(model_config(name, max(contexts))).eval()
        latency, memory = measure_decode(model, [1], contexts, decode_steps=16, repeats=repeats)
        assert all(row.matches_analytic for row in memory), f"{name}: measured cache bytes != analytic"
        results[name] = [
            (row.context, mem.measured_cache_bytes, row.decode_tokens_per_s)
            for row, mem in zip(latency, memory)
        ]
        print(
            f"  {name}: " + ", ".join(f"{c}: {b:,} B, {t:.1f} tok/s" for c, b, t in results[name]), flush=True
        )
    return results


def plot(results: dict[str, list[tuple[int, int, float]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for name, rows in results.items():
        contexts = [c for c, _, _ in rows]
        left.plot(contexts, [b / 2**20 for _, b, _ in rows], marker="o", label=name)
        right.plot(contexts, [t for _, _, t in rows], marker="o", label=name)
    for axis, label in ((left, "cache MiB per sequence (fp32)"), (right, "decode tokens/s (batch 1, CPU)")):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("context (tokens)")
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
    left.set_yscale("log")
    left.legend(fontsize=8)
    fig.suptitle("Constant-state layers: the state stays flat while K/V caches grow")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    contexts = [int(c) for c in args.contexts.split(",")]
    names = [n for n in args.models.split(",") if n]
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        raise SystemExit(f"--models: {unknown} unknown; allowed: {list(MODELS)}")
    results = measure(names, contexts, args.repeats)
    baseline = {c: (b, t) for c, b, t in results.get("gqa-2", [])}
    columns = ["model", "context", "cache bytes", "vs gqa-2", "decode tok/s", "vs gqa-2"]
    rows = []
    for name, measured in results.items():
        for context, nbytes, speed in measured:
            base = baseline.get(context)
            rows.append(
                [
                    name,
                    context,
                    f"{nbytes:,}",
                    f"x{nbytes / base[0]:.3f}" if base else "-",
                    f"{speed:.1f}",
                    f"x{speed / base[1]:.2f}" if base else "-",
                ]
            )
    title = f"Decode vs context, batch 1, CPU, {torch.get_num_threads()} thread(s), fp32"
    print_table(title, columns, rows, markdown=args.markdown)
    if args.plot:
        plot(results, args.plot)
        print(f"plot: {args.plot}")
    return results


if __name__ == "__main__":
    main()
