"""The KV-efficiency study (issue 6): what each attention form saves in KV memory, what it costs in
quality, and how fast it decodes, starting from the real MHA checkpoint in ../shared/data.

    python -m benchmarks.kv_study [--out runs/kv_study] [--rows mha,gqa-2] [--max-tokens 20000] [--markdown]

Resumable: every finished measurement of every row is saved at once in OUT/results.json, and a rerun
with the same settings skips it (``--redo`` measures again). Decode speed is re-measured on every run,
so its ratio to the MHA source always compares numbers taken in the same run.

Plan. Phase 1 (now) runs every row that today's transforms can build, zero-shot. Phase 2 wires in the
work of the other branches; each "phase 2" cell is one function to fill in below.

| row        | built by                                                              | phase |
|------------|-----------------------------------------------------------------------|-------|
| mha        | the source, stories260K-mha (8 KV heads)                              | 1     |
| gqa-4      | mean-pool 8 -> 4 KV heads: exact here, the source's heads are pairs    | 1     |
| gqa-2      | mean-pool 8 -> 2 KV heads (GQA paper baseline)                        | 1     |
| mqa        | mean-pool 8 -> 1 KV head                                              | 1     |
| cla-2      | gqa-4, then odd layers read the K/V of the layer before (CLA-2)       | 1     |
| swa-64     | a 64-token sliding window on every layer                              | 1     |
| swa-hybrid | 64-token windows on layers 0-3, layer 4 global                        | 1     |
| mla-1/4    | to_mla at 32 values/token/layer (1/4 of MHA), DeepseekV3-exportable    | 2     |
| mla-1/8    | to_mla at 16 values/token/layer (1/8 of MHA)                          | 2     |

| measurement             | meaning                                                                  | phase |
|-------------------------|--------------------------------------------------------------------------|-------|
| kv_bytes_per_token      | analytic cache bytes per token at the longest context (fp32), all layers | 1     |
| zero_shot_nll           | whole corpus, 512-token windows (the data README's procedure)            | 1     |
| heldout_nll             | the last 20 % of the corpus tokens, where uptrained models are scored    | 1     |
| uptrained_ce_nll        | heldout_nll after the fixed uptraining budget, cross-entropy only        | 2     |
| uptrained_distill_nll   | heldout_nll after the same budget, 1/2 CE + 1/2 KL to the MHA teacher    | 2     |
| decode_tokens_per_s     | batch 1, cache holding the longest context (re-measured every run)       | 1     |

The uptraining budget is TARGETS.md's: 300 optimizer steps of 16 x 256 tokens from the first 80 % of
the corpus. The GPU-sized configuration (a 1B-class model, 4096-token contexts, batch 32 decode) is
documented in phase 2 with the static-cache decode loop.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks.common import markdown_table, print_table
from kvforge.arch import CausalLM, ModelConfig, kv_bytes_per_token, mha_equivalent
from kvforge.conversion import atomic_file, load_pretrained
from kvforge.conversion.transforms import to_cla, to_gqa, to_mqa, to_window
from kvforge.training.evaluation import Corpus, load_corpus, measure_decode, perplexity
from kvforge.training.evaluation.loading import load_tokenizer
from kvforge.training.evaluation.plots import plot_quality_vs_bytes

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
StateDict = dict[str, torch.Tensor]
Build = Callable[[ModelConfig, StateDict], tuple[ModelConfig, StateDict]]


def _gqa4_then_cla(config: ModelConfig, state_dict: StateDict) -> tuple[ModelConfig, StateDict]:
    return to_cla(*to_gqa(config, state_dict, n_kv_heads=4, method="mean"), factor=2, init="first")


# row name -> (how it is built, builder; None = phase 2)
ROWS: dict[str, tuple[str, Build | None]] = {
    "mha": ("source (8 KV heads)", lambda c, s: (c, s)),
    "gqa-4": ("mean-pool to 4 KV heads (exact)", lambda c, s: to_gqa(c, s, n_kv_heads=4, method="mean")),
    "gqa-2": ("mean-pool to 2 KV heads", lambda c, s: to_gqa(c, s, n_kv_heads=2, method="mean")),
    "mqa": ("mean-pool to 1 KV head", lambda c, s: to_mqa(c, s, method="mean")),
    "cla-2": ("gqa-4 + CLA-2 (first layer's K/V)", _gqa4_then_cla),
    "swa-64": ("window 64 on every layer", lambda c, s: to_window(c, s, windows=64)),
    "swa-hybrid": (
        "window 64 on layers 0-3, layer 4 global",
        lambda c, s: to_window(c, s, windows=[64] * 4 + [None]),
    ),
    "mla-1/4": ("to_mla, 32 values/token/layer", None),
    "mla-1/8": ("to_mla, 16 values/token/layer", None),
}


@dataclass
class StudyData:
    corpus: Corpus  # the whole evaluation stream
    heldout: Corpus  # its last 20 %: where uptrained models are scored
    context: int  # longest context: the source's max_seq_len
    repeats: int


def kv_bytes(model: CausalLM, data: StudyData) -> float:
    return kv_bytes_per_token(model.config, data.context, torch.float32)


def zero_shot_nll(model: CausalLM, data: StudyData) -> float:
    return perplexity(model, data.corpus, data.context, batch_size=16).nll


def heldout_nll(model: CausalLM, data: StudyData) -> float:
    return perplexity(model, data.heldout, data.context, batch_size=16).nll


def decode_speed(model: CausalLM, data: StudyData) -> float:
    latency, _ = measure_decode(model, [1], [data.context], decode_steps=16, repeats=data.repeats)
    return latency[0].decode_tokens_per_s


# measurement -> (function; None = phase 2, cached across runs)
MEASUREMENTS: dict[str, tuple[Callable[[CausalLM, StudyData], float] | None, bool]] = {
    "kv_bytes_per_token": (kv_bytes, True),
    "zero_shot_nll": (zero_shot_nll, True),
    "heldout_nll": (heldout_nll, True),
    "uptrained_ce_nll": (None, True),  # phase 2: the training branch's uptraining, CE only
    "uptrained_distill_nll": (None, True),  # phase 2: the same budget with distillation
    "decode_tokens_per_s": (decode_speed, False),
}


class ResultStore:
    """OUT/results.json: ``{"fingerprint": ..., "rows": {row: {measurement: value}}}``, rewritten
    atomically after every measurement so an interrupted run loses at most the one in progress."""

    def __init__(self, path: Path, fingerprint: str, redo: bool) -> None:
        self.path = path
        self.fingerprint = fingerprint
        self.rows: dict[str, dict[str, float]] = {}
        if path.is_file() and not redo:
            saved = json.loads(path.read_text())
            if saved.get("fingerprint") != fingerprint:
                raise ValueError(
                    f"{path} holds results measured with other settings ({saved.get('fingerprint')} != "
                    f"{fingerprint}); pass --redo to start again or choose another --out"
                )
            self.rows = saved["rows"]

    def get(self, row: str, measurement: str) -> float | None:
        return self.rows.get(row, {}).get(measurement)

    def put(self, row: str, measurement: str, value: float) -> None:
        self.rows.setdefault(row, {})[measurement] = value
        with atomic_file(self.path) as tmp:
            tmp.write_text(json.dumps({"fingerprint": self.fingerprint, "rows": self.rows}, indent=2) + "\n")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--source", type=Path, default=SHARED / "stories260K-mha")
    parser.add_argument("--text", type=Path, default=SHARED / "corpora" / "tinystories_val_prefix.txt")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "kv_study")
    parser.add_argument("--rows", default=",".join(ROWS), help="comma-separated subset of the rows")
    parser.add_argument("--max-tokens", type=int, help="evaluate only the first N corpus tokens (quick runs)")
    parser.add_argument("--repeats", type=int, default=5, help="timed generations per decode-speed figure")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads; 1 by default: a 260K model is overhead-bound, and on shared cores extra "
        "OpenMP threads spin while waiting for each other (measured 4x slower decode with 2 threads under load)",
    )
    parser.add_argument(
        "--redo", action="store_true", help="ignore saved results and measure everything again"
    )
    parser.add_argument("--markdown", action="store_true", help="also print the table as Markdown")
    return parser.parse_args(argv)


# Bump when a measurement's procedure changes: saved numbers of an older procedure are then refused.
STUDY_VERSION = 1


def fingerprint(args: argparse.Namespace) -> str:
    """What the cached quality numbers depend on (the source's config file, the text, the settings);
    a change invalidates them."""
    parts = [
        STUDY_VERSION,
        str(args.source.resolve()),
        (args.source / "config.json").read_text(),
        hashlib.sha256(args.text.read_bytes()).hexdigest(),
        args.max_tokens,
    ]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]


def run_row(name: str, pretrained, data: StudyData, store: ResultStore) -> dict[str, float | None]:
    """Every measurement of one row: cached ones read back, the others computed (model built once)."""
    _, build = ROWS[name]
    values: dict[str, float | None] = {}
    model = None
    for measurement, (measure, cached) in MEASUREMENTS.items():
        saved = store.get(name, measurement) if cached else None
        if saved is not None or build is None or measure is None:
            values[measurement] = saved
            continue
        if model is None:
            config, state_dict = build(pretrained.config, pretrained.state_dict)
            model = CausalLM(config).eval()
            model.load_state_dict(state_dict)
        values[measurement] = measure(model, data)
        if cached:
            store.put(name, measurement, values[measurement])
        print(f"  {name}: {measurement} = {values[measurement]:.4f}", flush=True)
    return values


def table(
    results: dict[str, dict[str, float | None]], mha_bytes: float
) -> tuple[list[str], list[list[object]]]:
    columns = [
        "row",
        "built by",
        "KV bytes/token",
        "vs MHA",
        "zero-shot NLL",
        "held-out NLL",
        "uptrained CE",
        "uptrained distill",
        "decode tok/s",
        "decode vs MHA",
    ]
    baseline = results.get("mha", {}).get("decode_tokens_per_s")

    def cell(value: float | None, fmt: str) -> str:
        return "phase 2" if value is None else format(value, fmt)

    rows = []
    for name, values in results.items():
        speed = values["decode_tokens_per_s"]
        kv = values["kv_bytes_per_token"]
        rows.append(
            [
                name,
                ROWS[name][0],
                cell(kv, ",.0f"),
                cell(kv / mha_bytes if kv is not None else None, ".3f"),
                cell(values["zero_shot_nll"], ".4f"),
                cell(values["heldout_nll"], ".4f"),
                cell(values["uptrained_ce_nll"], ".4f"),
                cell(values["uptrained_distill_nll"], ".4f"),
                cell(speed, ",.0f"),
                cell(speed / baseline if speed is not None and baseline else None, ".2f")
                + ("×" if speed and baseline else ""),
            ]
        )
    return columns, rows


def main(argv: list[str] | None = None) -> dict[str, dict[str, float | None]]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = [row for row in args.rows.split(",") if row]
    unknown = [row for row in rows if row not in ROWS]
    if unknown:
        raise SystemExit(f"--rows: {unknown} are not study rows; allowed: {list(ROWS)}")
    torch.manual_seed(0)
    pretrained = load_pretrained(args.source)
    corpus = load_corpus(args.text, load_tokenizer(args.source), max_tokens=args.max_tokens)
    split = int(corpus.ids.numel() * 0.8)
    heldout = Corpus(f"{corpus.name}[80%:]", corpus.ids[split:], corpus.ids.numel() - split)
    data = StudyData(corpus, heldout, pretrained.config.max_seq_len, args.repeats)
    store = ResultStore(args.out / "results.json", fingerprint(args), args.redo)
    print(f"KV study: {len(rows)} rows, {corpus.ids.numel():,} evaluation tokens, results in {store.path}")
    results = {name: run_row(name, pretrained, data, store) for name in rows}
    mha_bytes = kv_bytes_per_token(mha_equivalent(pretrained.config), data.context, torch.float32)
    columns, table_rows = table(results, mha_bytes)
    title = f"KV study on {args.source.name} ({corpus.name}, {data.context}-token context, {torch.get_num_threads()} threads)"
    print_table(title, columns, table_rows)
    points = [
        (n, v["kv_bytes_per_token"], v["zero_shot_nll"])
        for n, v in results.items()
        if v["zero_shot_nll"] is not None
    ]
    if points:
        plot = plot_quality_vs_bytes(
            points, args.out / "pareto.png", f"zero-shot NLL, nats/token ({corpus.name})"
        )
        print(f"wrote {plot}")
    if args.markdown:
        print(markdown_table(columns, table_rows))
    return results


if __name__ == "__main__":
    main()
