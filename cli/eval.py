"""Evaluate models: perplexity (sliding windows), perplexity versus context length, passkey
retrieval, measured KV-cache bytes and peak memory, prefill/decode speed. Prints tables and writes
OUT/eval.json (every field: `kvforge eval --schema`) and PNG plots.

    kvforge eval MODEL_DIR_OR_CKPT [...] --text val.txt [--context 512 --stride 256] [--out runs/eval]
"""

from __future__ import annotations

import argparse
from dataclasses import fields
from pathlib import Path

import torch

from kvforge.conversion import gguf
from kvforge.conversion.loading import load_for_eval, resolve_device
from kvforge.evaluation.needles import NeedleSettings
from kvforge.evaluation.passkey import PasskeySettings
from kvforge.evaluation.plots import write_plots
from kvforge.evaluation.report import EvalReport, new_report, print_report, write_json
from kvforge.evaluation.runner import EvalSettings, check_settings, evaluate_model
from kvforge.evaluation.schema import schema_markdown


def _comma_list(cast, what: str):
    """An argparse type for ``1,2,3``-style lists."""

    def parse(text: str) -> list:
        try:
            return [cast(part) for part in text.split(",") if part]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of {what}") from None

    return parse


_ints = _comma_list(int, "integers")
_floats = _comma_list(float, "numbers")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "models",
        nargs="*",
        metavar="MODEL",
        help="model directories, llama.cpp .gguf files, Lightning .ckpt files or FSDP2 checkpoint directories",
    )
    parser.add_argument(
        "--text", action="append", default=[], metavar="FILE", help="evaluation text (repeatable)"
    )
    parser.add_argument(
        "--text-field", default="text", help="text column of .json/.jsonl/.csv/.parquet files"
    )
    parser.add_argument("--tasks", default="perplexity,context,passkey,memory", help="comma-separated subset")
    parser.add_argument("--context", type=int, help="perplexity window (default: the model's max_seq_len)")
    parser.add_argument("--stride", type=int, help="perplexity stride (default: the context)")
    parser.add_argument("--max-tokens", type=int, help="evaluate only the first N tokens of each text")
    parser.add_argument(
        "--contexts", type=_ints, help="context lengths, e.g. 128,256,512 (default: powers of two)"
    )
    parser.add_argument("--context-stride-fraction", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--passkey-contexts", type=_ints, help="passkey prompt lengths (default: --contexts)")
    parser.add_argument("--passkey-depths", type=_floats, default=[0.0, 0.25, 0.5, 0.75, 1.0])
    parser.add_argument("--passkey-trials", type=int, default=5)
    parser.add_argument("--passkey-digits", type=int, default=5)
    parser.add_argument("--passkey-seed", type=int, default=0)
    parser.add_argument(
        "--passkey-filler", default="classic", help="'classic' or a text file of haystack sentences"
    )
    parser.add_argument(
        "--needle-keys", type=int, default=4, help="needles per multi-key needle prompt (--tasks needles)"
    )
    parser.add_argument(
        "--needle-depths",
        type=_floats,
        default=[0.0, 0.5, 1.0],
        help="queried needle depths (--tasks needles)",
    )
    parser.add_argument(
        "--passkey-finetune",
        action="store_true",
        help="teach a copy of each model the format first (small models)",
    )
    parser.add_argument("--latency-batches", type=_ints, default=[1, 4])
    parser.add_argument("--decode-steps", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cache-dtype", help="fp32, bf16, fp16 (default: the model's dtype)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="fp32")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--tokenizer", help="tokenizer directory, when the model directory has none")
    parser.add_argument("--out", default="runs/eval", help="folder for eval.json and the plots")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing OUT/eval.json")
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument(
        "--schema", action="store_true", help="print the JSON fields and their meaning, then exit"
    )


def settings_from_args(args: argparse.Namespace) -> EvalSettings:
    """A flag named as a settings field fills that field (``--tasks`` split on commas); the needle task
    takes the passkey task's contexts, trials, key length and seed."""
    flags = {
        field.name: getattr(args, field.name) for field in fields(EvalSettings) if hasattr(args, field.name)
    }
    flags["tasks"] = [task for task in args.tasks.split(",") if task]
    prompts = dict(
        contexts=args.passkey_contexts,
        trials=args.passkey_trials,
        key_digits=args.passkey_digits,
        seed=args.passkey_seed,
    )
    return EvalSettings(
        **flags,
        corpora=list(args.text),
        passkey=PasskeySettings(**prompts, depths=args.passkey_depths, filler=args.passkey_filler),
        needles=NeedleSettings(**prompts, depths=args.needle_depths, n_keys=args.needle_keys),
    )


def run(args: argparse.Namespace) -> int:
    if args.schema:
        print(schema_markdown(EvalReport))
        return 0
    if not args.models:
        raise ValueError("give at least one MODEL directory to evaluate")
    settings = settings_from_args(args)
    check_settings(settings)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    json_path = out / "eval.json"
    if json_path.exists() and not args.overwrite:
        raise FileExistsError(f"{json_path} already exists; pass --overwrite to replace it")
    names = [Path(path).name for path in args.models]
    if len(set(names)) != len(names):
        names = [str(path) for path in args.models]
    reports = []
    for path, name in zip(args.models, names):
        loaded = load_for_eval(
            gguf.model_directory(path),  # a .gguf file: its import, cached
            device=settings.device,
            dtype=settings.dtype,
            tokenizer=args.tokenizer,
            name=name,
        )
        reports.append(evaluate_model(loaded, settings))
    report = new_report(settings, reports, resolve_device(settings.device))
    if not args.no_plots:
        report.plots = write_plots(reports, out)
    write_json(report, json_path)
    print_report(report)
    print(f"wrote {json_path}" + "".join(f", {p}" for p in report.plots.values()))
    return 0
