"""Scale: peak host memory (and CUDA memory) and time of kvforge jobs on random-weight checkpoints of real shape.

    PYTHONPATH=. python -m benchmarks.scale --jobs convert --shapes 0.27b,0.95b [--device cpu|cuda]
    PYTHONPATH=. python -m benchmarks.scale --jobs train --shapes 0.27b --device cpu \
        [--train-options "--devices 2 --strategy fsdp2 --precision bf16-mixed --steps 2"]

Checkpoints come from :mod:`benchmarks.scale_checkpoints` (written once under --workdir). Every job
runs in its own subprocess so that its peak resident memory (``ru_maxrss`` of that child, from
``os.wait4``) is its own; the target beside it is the issue's: 0.5 × the checkpoint's bytes on disk +
1.5 GiB. A job is one function ``JOBS[name](args, shape_name, checkpoint) -> rows``; add rows for a new
job by adding a function there. ``train`` is :mod:`benchmarks.scale_training` (uptraining the checkpoint
converted to GQA, with the unconverted one as teacher, then ``kvforge export``) in a subprocess: its rows
are the training start, one step with the teacher (target: 1.1 × ``MemoryCheck``'s estimate, issue 17)
and the export (the conversion's target).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.rusage import wait_measured
from benchmarks.source_tree import REPO, ensure_kvforge_importable

GIB = 2**30
COLUMNS = [
    "shape",
    "job",
    "checkpoint GiB",
    "device",
    "time s",
    "CPU s",
    "peak RSS GiB",
    "target GiB",
    "within",
    "peak CUDA GiB",
]
CONVERSIONS = {
    "gqa-mean": ("gqa", {"n_kv_heads": 4, "method": "mean"}),
    "gqa-aligned": ("gqa", {"n_kv_heads": 4}),
    "mla-512+64": ("mla", {"kv_lora_rank": 512, "rope_dims": 64}),
    "cla-2": ("cla", {"factor": 2}),
    "window-1024": ("window", {"windows": 1024}),
    "window-1024+sinks": ("window", {"windows": 1024, "sinks": True}),
    "chunked-1024": ("chunked", {"chunk": 1024, "global_every": 4}),
    "gta": ("gta", {}),
    "gla-2": ("gla", {"n_latent_heads": 2, "kv_lora_rank": 512, "rope_dims": 64}),
}


def run_measured(command: list[str], env: dict | None = None) -> tuple[float, float, float, str]:
    """Run ``command``; its wall time (s), CPU time (user + system s: what it costs on shared cores,
    where wall time also counts the other jobs), peak RSS (GiB, that child only) and its stdout."""
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env, cwd=REPO)
    output = process.stdout.read()
    code, cpu, peak = wait_measured(process)  # this parent imports no torch: its fork-time RSS is small
    elapsed = time.perf_counter() - start
    if code != 0:
        raise RuntimeError(f"{' '.join(command)} failed with exit code {code}:\n{output[-2000:]}")
    return elapsed, cpu, peak, output


def convert_worker(args: argparse.Namespace) -> None:
    """Child process: one conversion; prints its peak CUDA memory as JSON on the last line."""
    ensure_kvforge_importable()
    import torch

    from kvforge.conversion.convert import convert_checkpoint

    name, options = CONVERSIONS[args.conversion]
    options = (
        {**options, "refine_steps": args.refine_steps}
        if name in ("gqa", "mqa", "mla", "cla") and args.refine_steps
        else options
    )
    convert_checkpoint(
        args.checkpoint,
        args.out,
        name,
        options,
        device=args.device,
        calib_tokens=args.calib_tokens,
        overwrite=True,
    )
    cuda = torch.cuda.max_memory_allocated() / GIB if torch.cuda.is_available() else None
    print(json.dumps({"peak_cuda_gib": cuda}))


def convert_job(args: argparse.Namespace, shape: str, checkpoint: Path) -> list[list[object]]:
    from benchmarks.scale_checkpoints import checkpoint_bytes

    size = checkpoint_bytes(checkpoint) / GIB
    rows = []
    for conversion in args.conversions.split(","):
        out = Path(args.workdir) / f"{shape}-{conversion}"
        command = [
            sys.executable,
            "-m",
            "benchmarks.scale",
            "--worker",
            "convert",
            "--conversion",
            conversion,
        ]
        command += ["--checkpoint", str(checkpoint), "--out", str(out), "--device", args.device]
        command += ["--calib-tokens", str(args.calib_tokens), "--refine-steps", str(args.refine_steps)]
        env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        elapsed, cpu, peak, output = run_measured(command, env)
        cuda = json.loads(output.strip().splitlines()[-1])["peak_cuda_gib"]
        target = 0.5 * size + 1.5
        job = f"convert {conversion}" + (f" +refine {args.refine_steps}" if args.refine_steps else "")
        row = [shape, job, size, args.device, elapsed, cpu, peak, target, "yes" if peak <= target else "NO"]
        rows.append([*row, f"{cuda:.2f}" if cuda is not None else "-"])
        print(" | ".join(str(c) for c in rows[-1]), flush=True)
        if not args.keep_outputs:
            subprocess.run(["rm", "-rf", str(out)], check=True)
    return rows


def train_job(args: argparse.Namespace, shape: str, checkpoint: Path) -> list[list[object]]:
    """``benchmarks/scale_training.py --export`` on ``checkpoint``; the worst rank's figures, in this table's
    columns. Peaks are the ranks' own (``VmHWM``; CUDA: ``max_memory_allocated``), not this child's."""
    from benchmarks.scale_checkpoints import checkpoint_bytes

    size = checkpoint_bytes(checkpoint) / GIB
    out = Path(args.workdir) / f"{shape}-train.json"
    command = [sys.executable, str(REPO / "benchmarks" / "scale_training.py"), "--shape", shape]
    command += ["--source", str(checkpoint), "--workdir", args.workdir, "--export", "--out", str(out)]
    command += ["--cpu"] if args.device == "cpu" else []
    run_measured([*command, *shlex.split(args.train_options)])
    ranks = json.loads(out.read_text())
    first = ranks[0]
    setup = f"{first['world']} × {first['strategy']}, {first['precision']}"
    cuda = first["peak_kind"] == "cuda"
    peak = max(rank["peak_gib"] for rank in ranks)
    within = all(rank["peak_vs_estimate"] <= 1.1 for rank in ranks)
    target = max(1.1 * rank["estimate_gib"] for rank in ranks)
    start = max(rank["start_peak_gib"] for rank in ranks)
    export_target = 0.5 * size + 1.5
    device = "cuda" if cuda else "cpu"
    rows = [
        [shape, f"train start ({setup})", size, device, first["start_s"], "-", start, "-", "-", "-"],
        [
            shape,
            f"train step with teacher ({setup})",
            size,
            device,
            first["step_s"],
            first["step_cpu_s"],
            "-" if cuda else peak,
            target,
            "yes" if within else "NO",
            f"{peak:.2f}" if cuda else "-",
        ],
        [
            shape,
            "export (trained checkpoint)",
            size,
            "cpu",
            first["export_s"],
            "-",
            first["export_peak_gib"],
            export_target,
            "yes" if first["export_peak_gib"] <= export_target else "NO",
            "-",
        ],
    ]
    for row in rows:
        print(" | ".join(str(c) for c in row), flush=True)
    return rows


JOBS = {"convert": convert_job, "train": train_job}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", default="convert", help=f"comma list of {sorted(JOBS)}")
    parser.add_argument(
        "--shapes", default="0.27b", help="comma list of checkpoint shapes (0.27b, 0.95b, 8b)"
    )
    parser.add_argument(
        "--conversions", default=",".join(CONVERSIONS), help=f"comma list of {list(CONVERSIONS)}"
    )
    parser.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda")
    parser.add_argument(
        "--calib-tokens", type=int, default=4096, help="self-calibration tokens (default 4096)"
    )
    parser.add_argument("--refine-steps", type=int, default=0)
    parser.add_argument(
        "--train-options",
        default="--devices 2 --strategy fsdp2 --precision bf16-mixed --steps 2",
        help="benchmarks/scale_training.py options for --jobs train (see its --help)",
    )
    parser.add_argument("--workdir", default="/tmp/kvforge-scale", help="where checkpoints and outputs go")
    parser.add_argument("--keep-outputs", action="store_true")
    parser.add_argument("--worker", choices=("convert",), help=argparse.SUPPRESS)
    parser.add_argument("--conversion", help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker == "convert":
        convert_worker(args)
        return
    ensure_kvforge_importable()
    from benchmarks.common import markdown_table, print_table
    from benchmarks.scale_checkpoints import SHAPES, write_checkpoint

    rows: list[list[object]] = []
    for shape in args.shapes.split(","):
        checkpoint = write_checkpoint(SHAPES[shape], Path(args.workdir) / shape)
        for job in args.jobs.split(","):
            rows += JOBS[job](args, shape, checkpoint)
    print_table(f"scale: {os.cpu_count()} CPU cores, device {args.device}", COLUMNS, rows)
    print(markdown_table(COLUMNS, rows))


if __name__ == "__main__":
    main()
