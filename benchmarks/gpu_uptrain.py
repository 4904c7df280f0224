"""Uptrain a random-weight checkpoint of real shape with a bf16 teacher on one GPU: tokens/s, MFU and
peak CUDA memory beside ``MemoryCheck``'s estimate.

    PYTHONPATH=. python3 benchmarks/gpu_uptrain.py --out $OUT/uptrain.json            # 0.95B, 20 steps
    PYTHONPATH=. python3 benchmarks/gpu_uptrain.py --smoke                            # tiny, CPU, 3 steps

The source is a random MHA checkpoint (0.95B: 16 layers × 2048, 16 heads of 128, FFN 5632, vocab 32000,
written as bf16 safetensors); the student is its mean-pooled GQA-4 conversion (``init_from`` +
``convert``), the teacher the unconverted checkpoint, distillation α = 0.5, T = 1, bf16-mixed
precision. Data are random tokens: the figures are about speed and memory, not quality. Runs from a
source checkout with torch, lightning, transformers and safetensors only (no datasets, wandb or
jsonargparse). MFU counts the student's training FLOPs plus the teacher's forward
(``KVForgeLM.flops_per_batch``) against the dense bf16 peak of ``benchmarks/gpu_training.py``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.source_tree import ensure_kvforge_importable

ensure_kvforge_importable()

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402

from kvforge.arch import CausalLM, ModelConfig  # noqa: E402
from kvforge.arch.memory import GiB  # noqa: E402

SHAPES = {
    "0.95b": dict(vocab_size=32000, d_model=2048, n_layers=16, n_heads=16, ffn_dim=5632, max_seq_len=2048),
    "smoke": dict(vocab_size=256, d_model=64, n_layers=2, n_heads=4, ffn_dim=128, max_seq_len=64),
}
PEAK_BF16_FLOPS = {"H100": 989.5e12, "H200": 989.5e12}


class RandomTokens(Dataset):
    def __init__(self, vocab: int, block: int, n: int, seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, vocab, (n, block + 1), generator=generator)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i, :-1], "targets": self.ids[i, 1:]}


class RandomData(pl.LightningDataModule):
    """What ``MemoryCheck`` reads (``batch_size``, ``block_size``) and a loader of random blocks."""

    def __init__(self, vocab: int, block_size: int, batch_size: int, steps: int) -> None:
        super().__init__()
        self.block_size, self.batch_size = block_size, batch_size
        self.dataset = RandomTokens(vocab, block_size, batch_size * steps)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.dataset, batch_size=self.batch_size, drop_last=True)


class StepTimer(pl.Callback):
    """Wall time of each optimizer step (synchronised), and the peak CUDA memory of the run."""

    def __init__(self) -> None:
        self.seconds: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.seconds.append(time.perf_counter() - self._start)


def write_source(shape: dict, out: Path) -> Path:
    """A random-weight MHA checkpoint of ``shape``, bf16 safetensors."""
    from kvforge.conversion import save_pretrained

    config = ModelConfig(**shape)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):  # initialising 1 B parameters on the CPU takes a while
        model = CausalLM(config)
    state = {name: t.to("cpu", torch.bfloat16) for name, t in model.state_dict().items()}
    del model
    return save_pretrained(config, state, out, family="llama", dtype="bf16")


def run(args: argparse.Namespace) -> dict:
    from kvforge.training.distill import DistillationConfig
    from kvforge.training.memory_check import MemoryCheck
    from kvforge.training.module import KVForgeLM
    from kvforge.training.optim import OptimizerConfig

    shape = SHAPES["smoke" if args.smoke else args.shape]
    cuda = torch.cuda.is_available() and not args.smoke
    block = min(args.seq, shape["max_seq_len"])
    with tempfile.TemporaryDirectory() as tmp:
        source = write_source(shape, Path(tmp) / "source")
        module = KVForgeLM(
            init_from=str(source),
            convert={"to": "gqa", "n_kv_heads": args.n_kv_heads, "method": "mean"},
            distill=DistillationConfig(alpha=0.5, temperature=1.0, chunk_size=args.loss_chunk),
            optim=OptimizerConfig(lr=1e-4, warmup_steps=2, total_steps=args.steps),
            activation_checkpointing=args.activation_checkpointing,
            compile=args.compile,
        )
        data = RandomData(shape["vocab_size"], block, args.batch, args.steps)
        timer, memory = StepTimer(), MemoryCheck(margin=0.0)
        trainer = pl.Trainer(
            accelerator="gpu" if cuda else "cpu",
            devices=1,
            strategy=args.strategy,
            precision="bf16-mixed" if cuda else "32-true",
            max_steps=args.steps,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=[timer, memory],
            default_root_dir=tmp,
        )
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        trainer.fit(module, datamodule=data)
    steady = sorted(timer.seconds[min(args.warmup, len(timer.seconds) - 1) :])
    step = steady[len(steady) // 2]
    tokens_per_s = args.batch * block / step
    peak = None
    if cuda:
        name = torch.cuda.get_device_name()
        peak = next((flops for key, flops in PEAK_BF16_FLOPS.items() if key in name), None)
    estimate = memory.estimate
    row = {
        "shape": "smoke" if args.smoke else args.shape,
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "strategy": args.strategy,
        "batch": args.batch,
        "seq": block,
        "activation_checkpointing": args.activation_checkpointing,
        "compile": args.compile,
        "student_parameters": module.model.num_parameters(),
        "teacher_parameters": sum(p.numel() for p in module.teacher.parameters()),
        "teacher_dtype": str(next(module.teacher.parameters()).dtype),
        "step_ms_median": 1e3 * step,
        "tokens_per_s": tokens_per_s,
        "mfu": module.flops_per_batch / step / peak if peak else None,
        "peak_cuda_gib": torch.cuda.max_memory_allocated() / GiB if cuda else None,
        "estimate_gib": estimate.training / GiB,
        "estimate_rows": dict(estimate.rows()),
    }
    if row["peak_cuda_gib"]:
        row["peak_vs_estimate"] = row["peak_cuda_gib"] / row["estimate_gib"]
    return row


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shape on the CPU, a few steps")
    parser.add_argument("--shape", default="0.95b", choices=[s for s in SHAPES if s != "smoke"])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5, help="steps left out of the median step time")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--n-kv-heads", type=int, default=4)
    parser.add_argument("--loss-chunk", type=int, default=1024)
    parser.add_argument("--strategy", default="auto", help="auto (one device) or fsdp2")
    parser.add_argument("--activation-checkpointing", action="store_true")
    parser.add_argument("--compile", action="store_true", help="torch.compile each decoder layer")
    parser.add_argument("--out", help="write the row as JSON here")
    args = parser.parse_args(argv)
    if args.smoke:
        args.steps, args.warmup, args.batch, args.n_kv_heads = min(args.steps, 3), 1, 2, 2
    if args.strategy == "fsdp2":
        import kvforge.training.fsdp  # noqa: F401 - registers the strategy name
    row = run(args)
    width = max(len(k) for k in row)
    for key, value in row.items():
        print(f"{key:<{width}}  {value:,.3f}" if isinstance(value, float) else f"{key:<{width}}  {value}")
    if args.out:
        Path(args.out).write_text(json.dumps(row, indent=1) + "\n")
    return row


if __name__ == "__main__":
    main()
