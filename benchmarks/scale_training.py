"""Training at real scale: uptrain a random-weight MHA checkpoint converted to GQA, with distillation from
the unconverted model, on one or more ranks; per-rank peak memory beside ``MemoryCheck``'s estimate.

    PYTHONPATH=. python benchmarks/scale_training.py --shape 0.27b --devices 2 --strategy fsdp2   # CPU, gloo
    PYTHONPATH=. python benchmarks/scale_training.py --smoke                                      # tiny, seconds

The source (``--workdir``/source, written once by ``benchmarks.scale_checkpoints`` a shard at a time, bf16
safetensors, random weights: its shapes, 0.27B = 16 × 1024, 0.95B = 16 × 2048, 8B) is converted by the run itself
(``init_from`` + ``convert``: mean-pooled GQA, on global rank 0 only), and is also the teacher. The
rows: training start (seconds to the first step, peak RSS until then), the steps with the teacher
(median step, tokens/s), the per-rank peak (RSS on CPU: ``getrusage``, the whole process; CUDA:
``max_memory_allocated``) and the estimate (``MemoryEstimate.total``: on CPU it includes the process's
resident bytes before training, measured in ``MemoryCheck``), and each step's CPU seconds (user + system,
the whole process: what a step costs on shared cores). ``--host-allocator`` picks how the training
processes treat glibc's heap (``KVForgeLM(host_allocator=...)``: ``trim``, the default, ``pinned`` or
``default``), to measure what each saves and costs. ``benchmarks/scale.py --jobs train`` runs this script.
Data are random tokens. Runs from a source checkout with torch, lightning, transformers and safetensors only.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.source_tree import ensure_kvforge_importable

ensure_kvforge_importable()

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402

from benchmarks.scale_checkpoints import SHAPES as CHECKPOINT_SHAPES  # noqa: E402
from benchmarks.scale_checkpoints import Shape, write_checkpoint  # noqa: E402
from kvforge.arch.memory import GiB  # noqa: E402
from kvforge.conversion.host import DEFAULT_HOST_ALLOCATOR, HOST_ALLOCATORS  # noqa: E402

# The scale benchmarks' shapes (benchmarks/scale_checkpoints.py), plus a tiny one for a smoke run.
SHAPES = {**CHECKPOINT_SHAPES, "smoke": Shape(2, 64, 4, 4, 128, vocab_size=256, max_seq_len=64, shards=1)}


class RandomBlocks(Dataset):
    def __init__(self, vocab: int, block: int, n: int, seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, vocab, (n, block + 1), generator=generator)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i, :-1], "targets": self.ids[i, 1:]}


class RandomData(pl.LightningDataModule):
    """What ``MemoryCheck`` reads (``batch_size``, ``block_size``) and a loader of random blocks."""

    def __init__(self, vocab: int, block_size: int, batch_size: int, samples: int) -> None:
        super().__init__()
        self.block_size, self.batch_size = block_size, batch_size
        self.dataset = RandomBlocks(vocab, block_size, samples)

    def train_dataloader(self) -> DataLoader:
        sampler = None
        if torch.distributed.is_initialized():
            sampler = torch.utils.data.DistributedSampler(self.dataset, shuffle=False, drop_last=True)
        return DataLoader(self.dataset, batch_size=self.batch_size, sampler=sampler, drop_last=True)


class Timeline:
    """Resident bytes sampled every ``interval`` seconds in a thread, with named marks: where in a step
    the memory goes (tracemalloc does not see torch's allocations)."""

    def __init__(self, interval: float = 0.05) -> None:
        import threading

        self.start, self.samples, self.marks = time.perf_counter(), [], []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._sample, args=(interval,), daemon=True)
        self.thread.start()

    def _sample(self, interval: float) -> None:
        while not self.stop.wait(interval):
            self.samples.append((time.perf_counter() - self.start, rss()))

    def mark(self, name: str) -> None:
        self.marks.append((name, time.perf_counter() - self.start, rss(), peak_rss()))

    def finish(self) -> dict:
        self.stop.set()
        self.thread.join()
        return {"samples": self.samples, "marks": self.marks}


class Measure(pl.Callback):
    """Per rank: seconds to the first step and peak RSS then, each step's wall time, the final peaks and
    ``MemoryCheck``'s estimate, written to ``<directory>/rank<r>.json``; with ``timeline``, resident bytes
    sampled through the run with the hooks marked."""

    def __init__(self, directory: Path, memory_check, timeline: bool = False) -> None:
        self.directory, self.memory_check = directory, memory_check
        self.created = time.perf_counter()
        self.seconds: list[float] = []
        self.cpu_seconds: list[float] = []  # user + system, every thread of this process
        self.system_seconds: list[float] = []  # of which system (page faults, mmap/munmap)
        self.start_seconds = self.start_rss = None
        self.timeline = Timeline() if timeline else None

    def _mark(self, name: str) -> None:
        if self.timeline is not None:
            self.timeline.mark(name)

    def setup(self, trainer, pl_module, stage) -> None:
        self._mark("setup")

    def on_fit_start(self, trainer, pl_module) -> None:
        self._mark("fit_start (model and teacher built)")

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        self._mark("forward done")

    def on_after_backward(self, trainer, pl_module) -> None:
        self._mark("backward done")

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self._mark("before optimizer step")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._mark(f"step {batch_idx} start")
        _sync()
        if self.start_seconds is None:
            self.start_seconds, self.start_rss = time.perf_counter() - self.created, peak_rss()
        self._start, self._start_times = time.perf_counter(), os.times()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._mark(f"step {batch_idx} end")
        _sync()
        self.seconds.append(time.perf_counter() - self._start)
        times = os.times()
        self.cpu_seconds.append(times.user + times.system - self._start_times.user - self._start_times.system)
        self.system_seconds.append(times.system - self._start_times.system)
        # before ModelCheckpoint's hook (Lightning runs checkpoint callbacks last): the training peak alone
        self.step_peak = peak_rss()
        self.step_peak_cuda = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None

    def on_train_end(self, trainer, pl_module) -> None:
        estimate = self.memory_check.estimate
        record = {
            "rank": trainer.global_rank,
            "world": trainer.world_size,
            "start_seconds": self.start_seconds,
            "start_peak_rss": self.start_rss,
            "step_seconds": self.seconds,
            "step_cpu_seconds": self.cpu_seconds,
            "step_system_seconds": self.system_seconds,
            "host_allocator": pl_module.host_allocator.state,
            "peak_rss": self.step_peak,
            "peak_cuda": self.step_peak_cuda,
            "peak_rss_with_save": peak_rss(),
            "estimate_total": estimate.total,
            "estimate_training": estimate.training,
            "estimate_rows": dict(estimate.rows()),
            "flops_per_batch": pl_module.flops_per_batch,
            "teacher_dtype": str(next(pl_module.teacher.parameters()).dtype),
            "student_parameters": sum(p.numel() for p in pl_module.model.parameters()),
        }
        if self.timeline is not None:
            record["timeline"] = self.timeline.finish()
        self.directory.mkdir(parents=True, exist_ok=True)
        (self.directory / f"rank{trainer.global_rank}.json").write_text(json.dumps(record, indent=1))
        trainer.strategy.barrier("measured")


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def rss() -> int:
    """Resident bytes of this process now (``VmRSS``)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def peak_rss() -> int:
    """Peak resident bytes of this process so far: ``VmHWM`` (getrusage's ru_maxrss would carry the peak
    of the process that started this one across ``exec``)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def train(args: argparse.Namespace) -> list[dict]:
    """Fit ``args.steps`` steps; every rank's record (rank 0 returns them all, the other ranks none)."""
    import kvforge.training.fsdp  # noqa: F401 - registers the "fsdp2" strategy name
    from kvforge.training.checkpoint_io import AtomicCheckpointIO
    from kvforge.training.distill import DistillationConfig
    from kvforge.training.memory_check import MemoryCheck
    from kvforge.training.module import KVForgeLM
    from kvforge.training.optim import OptimizerConfig

    workdir = Path(args.workdir)
    shape = SHAPES[args.shape]
    source = Path(args.source) if args.source else workdir / f"source-{args.shape}"
    if "LOCAL_RANK" not in os.environ:  # the launching process; the ranks Lightning starts find it written
        write_checkpoint(shape, source)  # one shard in memory at a time: not this process's peak
    module = KVForgeLM(
        init_from=str(source),
        convert={"to": "gqa", "n_kv_heads": args.n_kv_heads, "method": "mean"},
        distill=DistillationConfig(alpha=0.5, temperature=1.0, chunk_size=args.loss_chunk),
        optim=OptimizerConfig(lr=1e-4, warmup_steps=1, total_steps=args.steps),
        activation_checkpointing=args.activation_checkpointing,
        compile=args.compile,
        host_allocator=args.host_allocator,
    )
    block = min(args.seq, shape.max_seq_len)
    data = RandomData(shape.vocab_size, block, args.batch, args.batch * args.steps * args.devices)
    memory = MemoryCheck(margin=0.0)
    records = workdir / f"run-{args.shape}-{args.strategy}-{args.devices}" / "ranks"
    cuda = torch.cuda.is_available() and not args.cpu
    callbacks = [memory, Measure(records, memory, timeline=args.timeline)]
    if args.export:  # a checkpoint at the last step, exported afterwards
        from lightning.pytorch.callbacks import ModelCheckpoint

        callbacks.append(ModelCheckpoint(dirpath=records.parent / "checkpoints", save_last=True))
    trainer = pl.Trainer(
        plugins=[AtomicCheckpointIO()],  # what train.py uses: streams the checkpoint to its file
        accelerator="gpu" if cuda else "cpu",
        devices=args.devices,
        strategy=args.strategy,
        precision=args.precision,
        max_steps=args.steps,
        logger=False,
        enable_checkpointing=args.export,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
        default_root_dir=str(records.parent),
    )
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer.fit(module, datamodule=data)
    if trainer.global_rank != 0:
        return []
    results = [json.loads((records / f"rank{r}.json").read_text()) for r in range(trainer.world_size)]
    if args.export:
        results[0]["export"] = measure_export(
            records.parent / "checkpoints" / "last.ckpt", records.parent / "hf"
        )
    return results


EXPORT_SCRIPT = """
import json, sys, time
start = time.perf_counter()
from kvforge.training.export import export_checkpoint
export_checkpoint(sys.argv[1], sys.argv[2], overwrite=True)
status = open("/proc/self/status").read().split("VmHWM:")[1].split()[0]
print(json.dumps({"seconds": time.perf_counter() - start, "peak_rss": int(status) * 1024}))
"""


def measure_export(checkpoint: Path, out: Path) -> dict:
    """``kvforge export`` of the run's checkpoint in a fresh process: seconds and peak RSS."""
    import subprocess

    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            filter(None, [str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH")])
        ),
    }
    command = [
        sys.executable,
        "-c",
        "from benchmarks.source_tree import ensure_kvforge_importable as e; e()\n" + EXPORT_SCRIPT,
    ]
    result = subprocess.run(
        [*command, str(checkpoint), str(out)], capture_output=True, text=True, env=env, check=True
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def summarise(record: dict, args: argparse.Namespace, warmup: int) -> dict:
    first = min(warmup, len(record["step_seconds"]) - 1)
    step = _median(record["step_seconds"][first:])
    peak = record["peak_cuda"] if record["peak_cuda"] is not None else record["peak_rss"]
    estimate = record["estimate_training"] if record["peak_cuda"] is not None else record["estimate_total"]
    return {
        "shape": args.shape,
        "strategy": args.strategy,
        "world": record["world"],
        "rank": record["rank"],
        "precision": args.precision,
        "teacher_dtype": record["teacher_dtype"],
        "start_s": record["start_seconds"],
        "start_peak_gib": record["start_peak_rss"] / GiB,
        "step_s": step,
        "step_cpu_s": _median(record["step_cpu_seconds"][first:]),
        "step_system_s": _median(record["step_system_seconds"][first:]),
        "host_allocator": record["host_allocator"],
        "tokens_per_s": args.batch * args.seq * record["world"] / step,
        "peak_gib": peak / GiB,
        "peak_kind": "cuda" if record["peak_cuda"] is not None else "rss",
        "estimate_gib": estimate / GiB,
        "peak_vs_estimate": peak / estimate,
        "model_gib_per_rank": 16 * record["student_parameters"] / record["world"] / GiB,
        "peak_with_checkpoint_save_gib": record["peak_rss_with_save"] / GiB,
        "export_s": record["export"]["seconds"] if "export" in record else None,
        "export_peak_gib": record["export"]["peak_rss"] / GiB if "export" in record else None,
    }


def _median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def print_rows(rows: list[dict]) -> None:
    columns = list(rows[0])
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for row in rows:
        cells = [f"{v:,.3f}" if isinstance(v, float) else str(v) for v in row.values()]
        print("| " + " | ".join(cells) + " |")


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shape, 2 steps")
    parser.add_argument("--shape", default="0.27b", choices=sorted(SHAPES))
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--strategy", default="auto", help="auto, ddp or fsdp2")
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1, help="steps left out of the median step time")
    parser.add_argument("--batch", type=int, default=1, help="sequences per rank")
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--n-kv-heads", type=int, default=4)
    parser.add_argument("--loss-chunk", type=int, default=1024)
    parser.add_argument("--activation-checkpointing", action="store_true")
    parser.add_argument("--compile", action="store_true", help="torch.compile each decoder layer")
    parser.add_argument("--export", action="store_true", help="checkpoint the last step and time its export")
    parser.add_argument("--timeline", action="store_true", help="sample each rank's RSS through the run")
    parser.add_argument("--cpu", action="store_true", help="stay on the CPU even where CUDA is available")
    parser.add_argument("--workdir", default="/tmp/kvforge-scale-training")
    parser.add_argument(
        "--source",
        help="the source checkpoint's directory (default <workdir>/source-<shape>, written if missing)",
    )
    parser.add_argument(
        "--host-allocator",
        default=DEFAULT_HOST_ALLOCATOR,
        choices=HOST_ALLOCATORS,
        help="KVForgeLM's host_allocator: malloc_trim three times a step (trim), glibc's mmap threshold "
        f"pinned (pinned) or glibc left alone (default); default {DEFAULT_HOST_ALLOCATOR}",
    )
    parser.add_argument("--out", help="write the rows as JSON here")
    return parser


def main(argv: list[str] | None = None) -> list[dict]:
    args = parser().parse_args(argv)
    if args.smoke:
        args.shape, args.steps, args.seq, args.n_kv_heads = "smoke", 2, 32, 2
    records = train(args)
    rows = [summarise(record, args, args.warmup) for record in records]
    if rows:
        print_rows(rows)
        if args.out:
            Path(args.out).write_text(json.dumps(rows, indent=1) + "\n")
    return rows


if __name__ == "__main__":
    main()
