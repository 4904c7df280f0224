"""The KV-efficiency study (issue 6): what each attention form saves in KV memory, what it costs in
quality zero-shot and after a fixed uptraining budget (with and without distillation), and how fast it
decodes, starting from the real MHA checkpoint in ../shared/data.

    python -m benchmarks.kv_study [--out runs/kv_study] [--rows mha,gqa-2] [--skip uptrained_ce_nll] [--markdown] [--plots DIR]

Resumable: every finished measurement of every row is saved at once in OUT/results.json, and a rerun
with the same settings skips it (``--redo`` measures again). Decode speed is re-measured on every run,
so its ratio to the MHA source always compares numbers taken in the same run.

Every row is the uptraining's own starting point: ``KVForgeLM(init_from=source, convert=..., calibration=...)``
(the path ``train.py`` takes), so zero-shot and uptrained numbers describe the same converted weights.
Calibration text = the corpus's first 32 × 256 tokens, inside the training 80 %.

| row         | built by (``model.convert``)                                                 | uptrained |
|-------------|------------------------------------------------------------------------------|-----------|
| mha         | the source, stories260K-mha (8 KV heads)                                     | no        |
| gqa-2       | to_gqa aligned merge to 2 KV heads, calibrated                               | yes       |
| mla-1/4     | to_mla, latent 24 + shared rotary key 8 = 32 values/token/layer, DeepseekV3  | yes       |
| cla-2       | to_gqa to 4 KV heads (exact here), then to_cla factor 2 (init=fit)           | yes       |
| mqa         | to_gqa aligned merge to 1 KV head, calibrated                                | yes       |
| mla-1/8     | to_mla, latent 8 + shared rotary key 8 = 16 values/token/layer, DeepseekV3   | yes       |
| swa-hybrid  | 64-token windows on layers 0-3, layer 4 global                               | yes       |
| gqa-4       | mean-pool 8 -> 4 KV heads: exact here, the source's heads are pairs           | no        |
| swa-64      | a 64-token sliding window on every layer (no weight change)                  | no        |
| gqa-2-mean  | mean-pool 8 -> 2 KV heads: TARGETS.md's baseline (only with ``--rows``)       | yes       |
| mha-control | the source through the same budget (only with ``--rows``)                    | yes       |
| swa-32, swa-64-trained | a 32/64-token window on every layer (only with ``--rows``)        | yes       |
| swa-32-sinks, swa-64-sinks | the same + attention sinks fitted on calibration (``--rows``) | yes       |
| chunked-nope | chunks of 64 on layers 0-3, layer 4 global and NoPE (``--rows``)            | yes       |
| gta-4       | mean-pool to 4 KV heads (exact), to_gta: 4 tied states + rotary key 4 = 36 values (``--rows``) | yes |
| gla-2       | to_mla latent 24 + rope 8, to_gla: 2 latent heads of 12 (``--rows``)         | yes       |
| linear-1:1, -3:1, -7:1 | to_linear (window 64), keep=ends: 2 / 1 / 0 of 5 softmax layers kept (``--rows``) | yes |
| deltanet-1:1, -3:1, -7:1 | to_deltanet, keep=ends: 2 / 1 / 0 of 5 softmax layers kept (``--rows``) | yes |

| measurement             | meaning                                                                       |
|-------------------------|-------------------------------------------------------------------------------|
| kv_bytes_per_token      | analytic cache bytes per token at the longest context (fp32), all layers      |
| zero_shot_nll           | whole corpus, 512-token windows (the data README's procedure)                 |
| heldout_nll             | the last 20 % of the corpus tokens, where uptrained models are scored         |
| uptrained_ce_nll        | heldout_nll after the uptraining budget, cross-entropy only                   |
| uptrained_distill_nll   | heldout_nll after the same budget, α·CE + (1-α)·T²·KL to the unconverted source |
| decode_tokens_per_s     | batch 1, cache holding the longest context (re-measured every run)            |

The uptraining budget is TARGETS.md's: 300 AdamW steps (warmup 30 + cosine) of 16 × 256 tokens from the
first 80 % of the corpus tokens, driven by ``benchmarks.uptrain_recipe.uptrain`` (Lightning +
KVForgeLM + TextDataModule). On 2 CPU cores the whole study takes about 45 minutes (one thread).

GPU-sized configuration (documented, not run here): a 1B-class MHA source (``--source``), its own
pre-training text (``--text``), ``--block 2048 --batch 32 --steps 2000`` and ``--threads 0``; the
Lightning trainer then runs on the GPU and decode speed is measured through the static-cache CUDA-graph
decoder (``measure_decode``), at the source's ``max_seq_len``.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch

from benchmarks.common import markdown_table, print_table
from benchmarks.kv_study_report import recovery_table, table, write_plots
from benchmarks.kv_study_rows import DEFAULT_ROWS, ROWS
from benchmarks.uptrain_recipe import Uptraining, calibration_text, converted_model, uptrain
from kvforge.arch import CausalLM, kv_bytes_per_token, mha_equivalent
from kvforge.conversion import atomic_file, load_pretrained
from kvforge.conversion.loading import load_tokenizer
from kvforge.evaluation import Corpus, load_corpus, measure_decode, perplexity
from kvforge.training.data import TextDataModule
from kvforge.training.model_source import CalibrationConfig

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"


@dataclass
class StudyData:
    source: Path
    corpus: Corpus  # the whole evaluation stream
    heldout: Corpus  # its last 20 % (the training module's held-out tokens): uptrained models are scored here
    context: int  # longest context: the source's max_seq_len
    repeats: int
    train: TextDataModule  # the first 80 %, in uptraining blocks
    calibration: CalibrationConfig
    budget: Uptraining  # the distillation run; the CE run is the same with alpha=None


class RowModels:
    """One row's models, built when a measurement first needs them."""

    def __init__(self, name: str, data: StudyData) -> None:
        self.name, self.row, self.data = name, ROWS[name], data

    @cached_property
    def converted(self) -> CausalLM:
        return converted_model(self.data.source, list(self.row.convert), self.data.calibration)

    def uptrained(self, alpha: float | None) -> CausalLM | None:
        if not self.row.uptrain or self.data.budget.steps == 0:  # --steps 0: the zero-shot study only
            return None
        run = dataclasses.replace(self.data.budget, alpha=alpha)
        model, seconds = uptrain(
            self.data.source, list(self.row.convert), self.data.train, run, self.data.calibration
        )
        print(
            f"  {self.name}: uptrained ({'CE only' if alpha is None else f'alpha {alpha}'}) in {seconds:.0f} s"
        )
        return model


def kv_bytes(row: RowModels, data: StudyData) -> float:
    return kv_bytes_per_token(row.converted.config, data.context, torch.float32)


def zero_shot_nll(row: RowModels, data: StudyData) -> float:
    return perplexity(row.converted, data.corpus, data.context, batch_size=16).nll


def heldout_nll(row: RowModels, data: StudyData) -> float:
    return _heldout(row.converted, data)


def uptrained_ce_nll(row: RowModels, data: StudyData) -> float | None:
    return _heldout(row.uptrained(alpha=None), data)


def uptrained_distill_nll(row: RowModels, data: StudyData) -> float | None:
    return _heldout(row.uptrained(alpha=data.budget.alpha), data)


def decode_speed(row: RowModels, data: StudyData) -> float:
    latency, _ = measure_decode(row.converted, [1], [data.context], decode_steps=16, repeats=data.repeats)
    return latency[0].decode_tokens_per_s


def _heldout(model: CausalLM | None, data: StudyData) -> float | None:
    return None if model is None else perplexity(model, data.heldout, data.context, batch_size=16).nll


# measurement -> (function returning None where it does not apply, cached across runs)
MEASUREMENTS: dict[str, tuple[Callable[[RowModels, StudyData], float | None], bool]] = {
    "kv_bytes_per_token": (kv_bytes, True),
    "zero_shot_nll": (zero_shot_nll, True),
    "heldout_nll": (heldout_nll, True),
    "uptrained_ce_nll": (uptrained_ce_nll, True),
    "uptrained_distill_nll": (uptrained_distill_nll, True),
    "decode_tokens_per_s": (decode_speed, False),
}


class ResultStore:
    """OUT/results.json: ``{"fingerprint": ..., "rows": {row: {measurement: value}}, "built_from": {row:
    its model.convert}}``, rewritten atomically after every measurement so an interrupted run loses at
    most the one in progress. A row whose definition changed since its numbers were saved is measured
    again; other settings (text, budget) are the fingerprint's, and a mismatch refuses the file."""

    def __init__(self, path: Path, fingerprint: str, redo: bool) -> None:
        self.path = path
        self.fingerprint = fingerprint
        self.rows: dict[str, dict[str, float]] = {}
        self.built_from: dict[str, list] = {}
        if path.is_file() and not redo:
            saved = json.loads(path.read_text())
            if saved.get("fingerprint") != fingerprint:
                raise ValueError(
                    f"{path} holds results measured with other settings ({saved.get('fingerprint')} != "
                    f"{fingerprint}); pass --redo to start again or choose another --out"
                )
            self.rows, self.built_from = saved["rows"], saved.get("built_from", {})

    def use_row(self, row: str, built_from: list) -> None:
        """Forget the row's saved numbers if they were measured on another definition of it."""
        if row in self.rows and self.built_from.get(row) != built_from:
            print(f"  {row}: its definition changed since {self.path} was written; measuring it again")
            del self.rows[row]
        self.built_from[row] = built_from

    def get(self, row: str, measurement: str) -> float | None:
        return self.rows.get(row, {}).get(measurement)

    def put(self, row: str, measurement: str, value: float) -> None:
        self.rows.setdefault(row, {})[measurement] = value
        saved = {"fingerprint": self.fingerprint, "rows": self.rows, "built_from": self.built_from}
        with atomic_file(self.path) as tmp:
            tmp.write_text(json.dumps(saved, indent=2) + "\n")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--source", type=Path, default=SHARED / "stories260K-mha")
    parser.add_argument("--text", type=Path, default=SHARED / "corpora" / "tinystories_val_prefix.txt")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "kv_study")
    parser.add_argument(
        "--rows", default=",".join(DEFAULT_ROWS), help=f"comma-separated rows, of {list(ROWS)}"
    )
    parser.add_argument(
        "--max-tokens", type=int, help="score only the first N tokens of each evaluation stream (quick runs)"
    )
    parser.add_argument("--repeats", type=int, default=5, help="timed generations per decode-speed figure")
    budget = parser.add_argument_group("uptraining budget and levers (TARGETS.md's protocol by default)")
    budget.add_argument("--steps", type=int, default=300, help="optimizer steps")
    budget.add_argument("--block", type=int, default=256, help="tokens per training sequence")
    budget.add_argument("--batch", type=int, default=16, help="sequences per step")
    budget.add_argument("--lr", type=float, default=1e-3, help="peak AdamW learning rate")
    budget.add_argument("--warmup", type=int, default=30, help="linear warmup steps, then cosine to lr/10")
    budget.add_argument("--alpha", type=float, default=0.5, help="distillation: weight of the CE term")
    budget.add_argument("--temperature", type=float, default=1.0, help="distillation temperature T")
    budget.add_argument(
        "--converted-only-steps",
        type=int,
        default=0,
        help="first steps updating only the parameters the transform created or changed",
    )
    budget.add_argument(
        "--calibration-sequences", type=int, default=32, help="256-token calibration rows for the transforms"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (0 = torch's default); 1 by default: a 260K model is overhead-bound, and on "
        "shared cores extra OpenMP threads spin while waiting for each other (measured 4x slower decode "
        "with 2 threads under load)",
    )
    parser.add_argument("--cache-dir", type=Path, default=REPO / ".cache" / "kvforge", help="token cache")
    parser.add_argument(
        "--redo", action="store_true", help="ignore saved results and measure everything again"
    )
    parser.add_argument(
        "--skip",
        default="",
        help=f"comma-separated measurements not to take this run (saved ones are still shown), of {list(MEASUREMENTS)}",
    )
    parser.add_argument("--markdown", action="store_true", help="also print the tables as Markdown")
    parser.add_argument(
        "--plots",
        type=Path,
        help="write the PNG plots here (default: OUT); docs/results holds the committed ones",
    )
    return parser.parse_args(argv)


# Bump when a measurement's procedure changes: saved numbers of an older procedure are then refused.
STUDY_VERSION = 2
BUDGET_OPTIONS = (
    "steps",
    "block",
    "batch",
    "lr",
    "warmup",
    "alpha",
    "temperature",
    "converted_only_steps",
    "calibration_sequences",
)


def fingerprint(args: argparse.Namespace) -> str:
    """What the cached quality numbers depend on (the source's config file, the text, the settings,
    the uptraining budget); a change invalidates them."""
    parts = [
        STUDY_VERSION,
        str(args.source.resolve()),
        (args.source / "config.json").read_text(),
        hashlib.sha256(args.text.read_bytes()).hexdigest(),
        args.max_tokens,
        {name: getattr(args, name) for name in BUDGET_OPTIONS},
    ]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]


def run_row(
    name: str, data: StudyData, store: ResultStore, skip: frozenset[str] = frozenset()
) -> dict[str, float | None]:
    """Every measurement of one row: cached ones read back, the others computed (models built once),
    except those in ``skip`` that were never saved (they stay ``None``)."""
    models = RowModels(name, data)
    store.use_row(name, json.loads(json.dumps(models.row.convert)))  # as JSON reads it back
    values: dict[str, float | None] = {}
    for measurement, (measure, cached) in MEASUREMENTS.items():
        saved = store.get(name, measurement) if cached else None
        if saved is not None:
            values[measurement] = saved
            continue
        if measurement in skip:
            values[measurement] = None
            continue
        values[measurement] = measure(models, data)
        if values[measurement] is None:  # does not apply to this row
            continue
        if cached:
            store.put(name, measurement, values[measurement])
        print(f"  {name}: {measurement} = {values[measurement]:.4f}", flush=True)
    return values


def load_study_data(args: argparse.Namespace, pretrained) -> StudyData:
    tokenizer = load_tokenizer(args.source, optional=True)
    corpus = load_corpus(args.text, tokenizer, max_tokens=args.max_tokens)
    train = TextDataModule(
        sources=[{"files": [str(args.text)]}],
        block_size=args.block,
        batch_size=args.batch,
        val_fraction=0.2,
        cache_dir=str(args.cache_dir),
    )
    train.build(pretrained.config, str(args.source))
    held = train.val_tokens()
    heldout = Corpus(
        f"{corpus.name}[80%:]", held[: args.max_tokens] if args.max_tokens else held, held.numel()
    )
    budget = Uptraining(
        args.steps,
        args.lr,
        args.warmup,
        args.alpha,
        args.temperature,
        args.converted_only_steps,
        args.threads,
    )
    calibration = calibration_text(args.text, args.calibration_sequences)
    return StudyData(
        args.source, corpus, heldout, pretrained.config.max_seq_len, args.repeats, train, calibration, budget
    )


def main(argv: list[str] | None = None) -> dict[str, dict[str, float | None]]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = [row for row in args.rows.split(",") if row]
    unknown = [row for row in rows if row not in ROWS]
    if unknown:
        raise SystemExit(f"--rows: {unknown} are not study rows; allowed: {list(ROWS)}")
    skip = frozenset(name for name in args.skip.split(",") if name)
    if skip - MEASUREMENTS.keys():
        raise SystemExit(
            f"--skip: {sorted(skip - MEASUREMENTS.keys())} are not measurements; allowed: {list(MEASUREMENTS)}"
        )
    torch.manual_seed(0)
    pretrained = load_pretrained(args.source)
    data = load_study_data(args, pretrained)
    store = ResultStore(args.out / "results.json", fingerprint(args), args.redo)
    print(
        f"KV study: {len(rows)} rows, {data.corpus.ids.numel():,} evaluation tokens "
        f"({data.heldout.ids.numel():,} held out), {args.steps} uptraining steps of {args.batch} x "
        f"{args.block} tokens; results in {store.path}"
    )
    results = {name: run_row(name, data, store, skip) for name in rows}
    mha_bytes = kv_bytes_per_token(mha_equivalent(pretrained.config), data.context, torch.float32)
    columns, table_rows = table(results, mha_bytes)
    title = (
        f"KV study on {args.source.name} ({data.corpus.name}, {data.context}-token context, "
        f"{torch.get_num_threads()} threads)"
    )
    print_table(title, columns, table_rows)
    tables = [(columns, table_rows)]
    source_nll = results.get("mha", {}).get("heldout_nll")
    if source_nll is not None:
        recovery = recovery_table(results, source_nll)
        print_table(f"Uptraining recovery (source held-out NLL {source_nll:.4f})", *recovery)
        tables.append(recovery)
    for path in write_plots(results, args.plots or args.out, data.corpus.name):
        print(f"wrote {path}")
    if args.markdown:
        for columns, table_rows in tables:
            print(markdown_table(columns, table_rows) + "\n")
    return results


if __name__ == "__main__":
    main()
