"""Zero-shot quality of the checkpoint transforms on stories260K (TARGETS.md, "Conversion quality").

    python -m benchmarks.conversion_quality [--rows gqa-2,mla-32] [--methods refined] [--calib botchan.txt]
                                            [--calib-tokens 16384] [--no-export] [--markdown]

Every row converts the real stories260K checkpoint (8 query heads, 4 K/V heads of 8 dims, 5 layers)
and scores it with the data README's procedure: ``windowed_nll`` over the WHOLE
tinystories_val_prefix.txt (AutoTokenizer, no special tokens, 512-token windows, no BOS). The
calibration text is never the evaluation text: by default it is sampled from the source model itself
(``sample_calibration_ids``, 32 sequences of 511 tokens after BOS, seed 0), or another corpus
(``--calib botchan.txt``). Beside
kvforge's loss, each model is exported with ``save_pretrained`` and, when the export is a stock
class (Llama, DeepseekV3, ...), reloaded with ``transformers.AutoModelForCausalLM`` and scored again
by the same procedure: both columns must agree. ``floats/tok/layer`` is the cache per token and
layer (MHA = 128, the source = 64); ``KV bytes/tok`` is the bf16 cache per token, all layers, at 512.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks.common import print_table

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
# Adam steps per layer on the block's reconstruction error after the closed-form fit (FitOptions).
REFINE = 100
TARGETS = {"gqa-2": 0.50, "mqa": 1.00, "mla-32": 0.50, "cla-2": 1.00}


@dataclass
class Row:
    name: str
    method: str
    build: Callable  # (config, state_dict, calibration) -> (config, state_dict)


def rows() -> list[Row]:
    from kvforge.conversion.transforms import to_cla, to_gqa, to_mla, to_mqa, to_window

    def mla(rank: int, rope: int, selection: str = "contribution", **options) -> Callable:
        return lambda c, s, x: to_mla(
            c, s, x, kv_lora_rank=rank, rope_dims=rope, rope_selection=selection, **options
        )

    return [
        Row("source", "stories260K (GQA-4)", lambda c, s, x: (c, s)),
        Row("gqa-2", "mean-pool (GQA paper)", lambda c, s, x: to_gqa(c, s, n_kv_heads=2, method="mean")),
        Row("gqa-2", "aligned, weights only", lambda c, s, x: to_gqa(c, s, n_kv_heads=2)),
        Row("gqa-2", "aligned, calibrated", lambda c, s, x: to_gqa(c, s, x, n_kv_heads=2)),
        Row(
            "gqa-2",
            f"aligned, calibrated, refined {REFINE}",
            lambda c, s, x: to_gqa(c, s, x, n_kv_heads=2, refine_steps=REFINE),
        ),
        Row("mqa", "mean-pool (GQA paper)", lambda c, s, x: to_mqa(c, s, method="mean")),
        Row("mqa", "aligned, calibrated", lambda c, s, x: to_mqa(c, s, x)),
        Row(
            "mqa",
            f"aligned, calibrated, refined {REFINE}",
            lambda c, s, x: to_mqa(c, s, x, refine_steps=REFINE),
        ),
        Row("mla-64", "rank 56 + rope 8 (all pairs)", mla(56, 8)),
        Row("mla-64", "rank 60 + rope 4, contribution", mla(60, 4)),
        # head_dim 8: every key dimension rotates, so the shared rotary key keeps all 4 pairs (24 + 8 = 32).
        Row("mla-32", "rank 24 + rope 8 (all pairs)", mla(24, 8)),
        Row("mla-32", f"rank 24 + rope 8 (all pairs), refined {REFINE}", mla(24, 8, refine_steps=REFINE)),
        Row("mla-32", "rank 30 + rope 2, contribution", mla(30, 2)),
        Row("mla-32", "rank 28 + rope 4, contribution", mla(28, 4)),
        Row("mla-32", f"rank 28 + rope 4, contribution, refined {REFINE}", mla(28, 4, refine_steps=REFINE)),
        Row("mla-32", "rank 28 + rope 4, high-frequency", mla(28, 4, "high")),
        Row("mla-32", "rank 28 + rope 4, uniform", mla(28, 4, "uniform")),
        Row("mla-16", "rank 8 + rope 8 (all pairs)", mla(8, 8)),
        Row("mla-16", "rank 14 + rope 2, contribution", mla(14, 2)),
        Row("cla-2", "first layer's K/V", lambda c, s, x: to_cla(c, s, factor=2, init="first")),
        Row("cla-2", "mean of the group", lambda c, s, x: to_cla(c, s, factor=2, init="mean")),
        Row("cla-2", "fit (least squares), calibrated", lambda c, s, x: to_cla(c, s, x, factor=2)),
        # Same bytes (3 K/V sets for 5 layers), groups [0], [1, 2], [3, 4]: layer 0 keeps its own K/V.
        Row("cla-2", "first, offset 1", lambda c, s, x: to_cla(c, s, factor=2, init="first", offset=1)),
        Row("cla-2", "fit, offset 1, calibrated", lambda c, s, x: to_cla(c, s, x, factor=2, offset=1)),
        Row(
            "cla-2",
            f"fit, offset 1, refined {REFINE}",
            lambda c, s, x: to_cla(c, s, x, factor=2, offset=1, refine_steps=REFINE),
        ),
        Row("swa-64", "window 64, all layers", lambda c, s, x: to_window(c, s, windows=64)),
        Row(
            "swa-hybrid",
            "64 on layers 0-3, layer 4 global",
            lambda c, s, x: to_window(c, s, windows=[64] * 4 + [None]),
        ),
    ]


class StockLM(torch.nn.Module):
    """A transformers causal LM behind the ``windowed_nll`` interface: final hidden states (after the
    final norm) and the head's weight, which the chunked loss multiplies itself."""

    def __init__(self, hf: torch.nn.Module, config) -> None:
        super().__init__()
        self.hf, self.config = hf, config
        self.model, self.lm_head = hf.model, hf.get_output_embeddings()  # model.embed_tokens: the device

    def hidden_states(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(ids).last_hidden_state


def stock_loss(config, state_dict, eval_ids: torch.Tensor, source: Path) -> tuple[float | None, str]:
    """Export, reload with stock transformers and score; ``None`` when the export is kvforge-typed."""
    from transformers import AutoModelForCausalLM

    from kvforge.arch.evaluate import windowed_nll
    from kvforge.conversion import plan_export, save_pretrained

    plan = plan_export(config)
    if not plan.family.stock:
        return None, "kvforge-typed"
    with tempfile.TemporaryDirectory() as tmp:
        out = save_pretrained(config, state_dict, Path(tmp) / "model", tokenizer_from=source)
        hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        return windowed_nll(StockLM(hf, config), eval_ids).mean, plan.family.architecture


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", help="comma list of row names to run (default: all)")
    parser.add_argument(
        "--calib",
        default="self",
        help="calibration corpus in shared/data/corpora, or 'self' (default): sampled from the source model",
    )
    parser.add_argument("--calib-tokens", type=int, default=16384)
    parser.add_argument(
        "--methods", help="score only the rows whose method contains this text (e.g. refined)"
    )
    parser.add_argument("--no-export", action="store_true", help="skip the stock-transformers column")
    parser.add_argument("--markdown", action="store_true", help="also print the table as markdown")
    args = parser.parse_args()

    import logging

    from transformers import AutoTokenizer

    from kvforge.arch import CausalLM, kv_bytes_per_token
    from kvforge.arch.evaluate import windowed_nll
    from kvforge.conversion import load_pretrained
    from kvforge.conversion.transforms import load_calibration_ids, sample_calibration_ids

    logging.getLogger("kvforge.conversion").setLevel(logging.ERROR)
    torch.manual_seed(0)
    source_dir = DATA / "stories260K"
    source = load_pretrained(source_dir)
    tokenizer = AutoTokenizer.from_pretrained(source_dir)
    text = (DATA / "corpora" / "tinystories_val_prefix.txt").read_text(encoding="utf-8-sig")
    eval_ids = torch.tensor(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
    if args.calib == "self":  # 511 tokens after BOS: sequences fit the 512-token context
        calibration = sample_calibration_ids(source.config, source.state_dict, args.calib_tokens, 511)
    else:
        calibration = load_calibration_ids(DATA / "corpora" / args.calib, source_dir, args.calib_tokens, 512)
    wanted = set(args.rows.split(",")) | {"source"} if args.rows else None

    columns = [
        "form",
        "method",
        "floats/tok/layer",
        "KV bytes/tok",
        "NLL",
        "Δ vs source",
        "target",
        "stock NLL",
        "exported as",
        "s",
    ]
    table, source_nll = [], None
    for row in rows():
        if wanted is not None and row.name not in wanted:
            continue
        if args.methods and row.name != "source" and args.methods not in row.method:
            continue
        start = time.perf_counter()
        config, state_dict = row.build(source.config, source.state_dict, calibration)
        model = CausalLM(config).eval()
        model.load_state_dict(state_dict)
        nll = windowed_nll(model, eval_ids).mean
        source_nll = nll if source_nll is None else source_nll
        stock, family = (
            (None, "-") if args.no_export else stock_loss(config, state_dict, eval_ids, source_dir)
        )
        kv_bytes = kv_bytes_per_token(config, 512, "bf16")
        target = TARGETS.get(row.name)
        table.append(
            [
                row.name,
                row.method,
                f"{kv_bytes / 2 / config.n_layers:g}",
                f"{kv_bytes:,.0f}",
                f"{nll:.4f}",
                f"{nll - source_nll:+.4f}",
                f"≤ +{target:.2f} {'met' if nll - source_nll <= target else 'MISSED'}" if target else "",
                f"{stock:.4f}" if stock is not None else "",
                family,
                f"{time.perf_counter() - start:.0f}",
            ]
        )
        print(" | ".join(str(cell) for cell in table[-1]), flush=True)
    title = f"Zero-shot conversion of stories260K ({eval_ids.numel():,} eval tokens; calibration {calibration.numel():,} tokens of {args.calib})"
    print_table(title, columns, table, markdown=args.markdown)


if __name__ == "__main__":
    main()
