"""GPU benchmark suite: attention kernels, training and decode, each against a baseline measured in the
same run (stock transformers; the best backend for ``auto``), with the targets of shared/GPU.md checked
at the end. Prints tables and writes everything to one JSON file.

    PYTHONPATH=. python benchmarks/gpu.py                      # all sections, full sizes (needs a GPU)
    PYTHONPATH=. python benchmarks/gpu.py --sections decode --decode-contexts 4096 --batches 32
    PYTHONPATH=. python benchmarks/gpu.py --sections attention --write-table   # refresh `auto`'s table
    python benchmarks/gpu.py --smoke                             # tiny shapes, CPU, seconds

Needs torch and transformers only (no datasets / wandb / jsonargparse); runs from a source checkout.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # `python benchmarks/gpu.py`: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.source_tree import ensure_kvforge_importable

ensure_kvforge_importable()

import torch  # noqa: E402

from benchmarks.common import markdown_table  # noqa: E402
from benchmarks.gpu_attention import default_backends, measure_attention, table_rows  # noqa: E402
from benchmarks.gpu_decode import copy_bandwidth, measure_decode  # noqa: E402
from benchmarks.gpu_models import FORMS, Shape  # noqa: E402
from benchmarks.gpu_targets import check_targets  # noqa: E402
from benchmarks.gpu_training import measure_training, peak_flops  # noqa: E402

SECTIONS = ("attention", "training", "decode")


def _ints(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part]


def _names(text: str) -> list[str]:
    return [part for part in text.split(",") if part]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--smoke", action="store_true", help="tiny shapes and few repeats (CPU, seconds)")
    parser.add_argument(
        "--sections",
        type=_names,
        default=list(SECTIONS),
        help="comma-separated subset of " + ",".join(SECTIONS),
    )
    parser.add_argument("--out", type=Path, default=Path("runs/gpu_benchmark.json"), help="JSON results file")
    parser.add_argument(
        "--forms", type=_names, default=None, help=f"model forms (default: {','.join(FORMS)})"
    )
    parser.add_argument(
        "--backends", type=_names, default=None, help="attention backends (default: all available + auto)"
    )
    parser.add_argument(
        "--attention-forms", type=_names, default=None, help="attention section forms (default: all)"
    )
    parser.add_argument(
        "--contexts", type=_ints, default=None, help="attention contexts (default 2048..32768)"
    )
    parser.add_argument(
        "--decode-contexts", type=_ints, default=None, help="decode contexts (default 1024..32768)"
    )
    parser.add_argument("--batches", type=_ints, default=None, help="decode batches (default 1,32)")
    parser.add_argument("--steps", type=int, default=None, help="decode steps per measurement (default 32)")
    parser.add_argument("--train-batch", type=int, default=None, help="training batch (default 8)")
    parser.add_argument("--train-seq", type=int, default=None, help="training sequence length (default 2048)")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per measurement")
    parser.add_argument("--no-stock", action="store_true", help="skip the stock transformers baselines")
    parser.add_argument("--no-compile", action="store_true", help="training: eager only")
    parser.add_argument(
        "--no-cuda-graph", action="store_true", help="decode: static cache without graph capture"
    )
    parser.add_argument("--compile-decode", action="store_true", help="decode: torch.compile the step too")
    parser.add_argument(
        "--peak-tflops", type=float, default=None, help="MFU denominator if the GPU is not an H100/H200"
    )
    parser.add_argument(
        "--write-table", action="store_true", help="rewrite this device's rows of kernels/backend_table.json"
    )
    args = parser.parse_args(argv)
    unknown = sorted(set(args.sections) - set(SECTIONS))
    if unknown:
        parser.error(f"--sections: unknown {unknown}; allowed: {list(SECTIONS)}")
    smoke = args.smoke
    defaults = dict(
        forms=["gqa", "mla", "swa"] if smoke else list(FORMS),
        contexts=[32, 64] if smoke else [2048, 4096, 8192, 16384, 32768],
        decode_contexts=[24] if smoke else [1024, 2048, 4096, 8192, 16384, 32768],
        batches=[2] if smoke else [1, 32],
        steps=3 if smoke else 32,
        train_batch=2 if smoke else 8,
        train_seq=32 if smoke else 2048,
        repeats=1 if smoke else 10,
    )
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


def _device_record(device: torch.device) -> dict:
    import transformers

    record = dict(
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        torch=torch.__version__,
        transformers=transformers.__version__,
        cuda=torch.version.cuda,
        date=time.strftime("%Y-%m-%d %H:%M"),
    )
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        record["device_key"] = f"sm{major}{minor}"
    return record


def _cell(row: dict, column: str) -> object:
    value = row.get(column)
    if value is None:
        return "—"
    if column == "kv_bytes":
        return f"{value / 2**20:,.1f} MiB"
    if column in ("hbm_fraction", "mfu"):
        return f"{100 * value:.1f} %"
    if column.startswith("vs_"):
        return f"{value:.2f}×"
    if isinstance(value, float):
        return f"{value:,.3g}" if abs(value) < 100 else f"{value:,.0f}"
    return value


def _show(title: str, rows: list[dict], columns: list[str]) -> None:
    """A Markdown table: readable in a log, pasteable into docs/results.md, never truncated."""
    print(f"\n### {title}\n")
    print(markdown_table(columns, [[_cell(row, column) for column in columns] for row in rows]))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    if args.smoke and device.type == "cpu":
        torch.set_num_threads(1)  # tiny ops: thread hand-offs would cost more than they save
    results: dict = {"meta": _device_record(device), "args": {k: str(v) for k, v in vars(args).items()}}
    shape = Shape(
        smoke=args.smoke,
        max_seq_len=max([*args.decode_contexts, args.train_seq]) + args.steps + 1,
        window=16 if args.smoke else 1024,
    )
    name = results["meta"]["device"]

    if "attention" in args.sections:
        backends = args.backends or default_backends()
        rows = measure_attention(
            args.smoke, args.contexts, backends, device, dtype, args.repeats, args.attention_forms
        )
        results["attention"] = rows
        _show(
            f"Attention on {name} ({str(dtype).removeprefix('torch.')}): TFLOP/s, fwd+bwd = 3.5 × fwd FLOPs",
            [r for r in rows if r.get("status") == "ok"],
            [
                "form",
                "context",
                "batch",
                "backend",
                "resolved",
                "fwd_ms",
                "fwd_tflops",
                "fwd_bwd_ms",
                "fwd_bwd_tflops",
                "gbs",
                "vs_best",
                "best_backend",
            ],
        )
        if args.write_table and device.type == "cuda":
            _write_table(table_rows(rows, results["meta"]["device_key"], name), results["meta"]["device_key"])

    if "training" in args.sections:
        modes = ["eager"] if args.no_compile or args.smoke else ["eager", "compile"]
        rows = measure_training(
            shape, args.forms, modes, not args.no_stock, args.train_batch, args.train_seq, device, dtype, args.repeats,
            peak_flops(device, args.peak_tflops),
        )  # fmt: skip
        results["training"] = rows
        _show(
            f"Training on {name}: batch {args.train_batch} × {args.train_seq}, fused AdamW, {str(dtype).removeprefix('torch.')}",
            rows,
            [
                "impl",
                "form",
                "mode",
                "status",
                "step_ms",
                "tokens_per_s",
                "mfu",
                "vs_transformers_eager",
                "vs_transformers_compile",
            ],
        )

    if "decode" in args.sections:
        bandwidth = copy_bandwidth(device, (16 if args.smoke else 1024) * 2**20)
        results["copy_bandwidth_gbs"] = bandwidth / 1e9
        rows = measure_decode(
            shape, args.forms, args.decode_contexts, args.batches, args.steps, device, dtype, bandwidth,
            not args.no_stock, device.type == "cuda" and not args.no_cuda_graph, args.compile_decode, max(1, args.repeats // 3),
        )  # fmt: skip
        results["decode"] = rows
        _show(
            f"Greedy decode on {name}, {args.steps} steps after the context; HBM bound at {bandwidth / 1e9:,.0f} GB/s copy bandwidth",
            rows,
            [
                "form",
                "impl",
                "context",
                "batch",
                "status",
                "kv_bytes",
                "ms_step",
                "tokens_per_s",
                "hbm_bound_ms",
                "hbm_fraction",
                "vs_transformers",
            ],
        )

    results["targets"] = check_targets(results, smoke=args.smoke)
    _show("Targets (shared/GPU.md, TARGETS.md)", results["targets"], ["target", "measured", "status"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1, default=str) + "\n")
    print(f"wrote {args.out}")
    return 0


def _write_table(rows: list[dict], device_key: str) -> None:
    from kvforge.conversion import atomic_file
    from kvforge.kernels.auto import TABLE_PATH

    table = json.loads(TABLE_PATH.read_text())
    table["rows"] = [row for row in table["rows"] if row["device"] != device_key] + rows
    with atomic_file(TABLE_PATH) as tmp:
        tmp.write_text(json.dumps(table, indent=1) + "\n")
    print(f"rewrote the {device_key} rows of {TABLE_PATH} ({len(rows)} rows)")


if __name__ == "__main__":
    sys.exit(main())
