"""TARGETS.md's uptraining recipe through kvforge's training stack (KVForgeLM + TextDataModule + Lightning):

    stories260K-mha → a transform (default GQA with 2 K/V heads, = 4→2 from stories260K), then
    300 optimizer steps of 16 × 256 tokens on the first 80 % of tinystories_val_prefix.txt's tokens,
    AdamW with warmup + cosine; loss on the last 20 % (512-token windows, no BOS; source 1.6651).

    python -m benchmarks.uptrain_recipe [--variants ce,distill,distill-kv-first] [--steps 300] [--calibrate] [--markdown]

``uptrain`` is the one uptraining driver of the benchmarks (``benchmarks.kv_study`` runs it per row).

Prints the zero-shot loss after conversion and the loss after each variant, relative to the source
and to TARGETS' baselines (mean-pool + CE 2.4028, mean-pool + ½CE + ½KL 2.3747; target ≤ 1.6818).
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks.common import print_table
from kvforge.arch import CausalLM
from kvforge.arch.evaluate import windowed_nll
from kvforge.conversion import load_pretrained
from kvforge.training.data import TextDataModule
from kvforge.training.distill import DistillationConfig
from kvforge.training.model_source import CalibrationConfig
from kvforge.training.module import KVForgeLM
from kvforge.training.optim import OptimizerConfig

SHARED = Path(os.environ.get("KVFORGE_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
SOURCE_LOSS = 1.6651
# name -> (distillation alpha or None, steps training only the converted parameters)
VARIANTS = {
    "ce": (None, 0),
    "distill": (0.5, 0),
    "distill-kv-first": (0.5, 100),
    "kl-only": (0.0, 0),
    "kl-only-kv-first": (0.0, 100),
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--variants", default="ce,distill,distill-kv-first")
    parser.add_argument(
        "--convert", default="gqa:n_kv_heads=2", help="transform:option=value,...[+transform:...] (in order)"
    )
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--block", type=int, default=256, help="tokens per training sequence")
    parser.add_argument("--batch", type=int, default=16, help="sequences per step")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--temperature", type=float, default=1.0, help="distillation temperature T")
    parser.add_argument(
        "--calibrate",
        action="store_true",
        help="give the transform calibration text: the corpus's first 32 x 256 tokens (training part)",
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--markdown", action="store_true")
    return parser.parse_args()


def parse_convert(text: str) -> list[dict]:
    """``gqa:n_kv_heads=4+cla:factor=2`` → ``[{to: gqa, n_kv_heads: 4}, {to: cla, factor: 2}]``."""
    steps = []
    for step in text.split("+"):
        name, _, options = step.partition(":")
        convert = {"to": name}
        for item in filter(None, options.split(",")):
            key, value = item.split("=")
            convert[key] = int(value) if value.lstrip("-").isdigit() else value
        steps.append(convert)
    return steps


@dataclass
class Uptraining:
    """One uptraining run of TARGETS.md's recipe: the budget and the levers it allows."""

    steps: int = 300
    lr: float = 1e-3
    warmup: int = 30
    alpha: float | None = 0.5  # weight of the CE; None = CE only (no teacher), 0 = KL only
    temperature: float = 1.0
    converted_only_steps: int = 0  # first steps updating only what the transform created or changed
    threads: int = 1  # torch CPU threads; 0 = leave torch's default
    trainable: str = "all"  # training.trainable.TRAINABLE: all, or attention only
    teacher: str | None = None  # teacher directory; None = the unconverted source


def uptrain(
    source: Path,
    convert: list[dict],
    data: TextDataModule,
    run: Uptraining,
    calibration: CalibrationConfig | None = None,
) -> tuple[CausalLM, float]:
    """Convert ``source`` (teacher = the unconverted source), train it with Lightning on ``data``'s
    training blocks, and return the trained model and the training wall-clock seconds."""
    import lightning.pytorch as pl

    if run.threads:
        torch.set_num_threads(run.threads)
    torch.manual_seed(0)
    distill = (
        DistillationConfig(alpha=run.alpha, temperature=run.temperature, teacher=run.teacher)
        if run.alpha is not None
        else None
    )
    optim = OptimizerConfig(lr=run.lr, warmup_steps=run.warmup, weight_decay=0.0, min_lr_ratio=0.1)
    module = KVForgeLM(
        init_from=str(source),
        convert=convert or None,
        calibration=calibration,
        distill=distill,
        optim=optim,
        converted_only_steps=run.converted_only_steps,
        trainable=run.trainable,
    )
    trainer = pl.Trainer(
        max_steps=run.steps,
        accelerator="auto",
        precision="bf16-mixed" if torch.cuda.is_available() else "32-true",
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
        limit_val_batches=0,
        gradient_clip_val=1.0,
    )
    start = time.perf_counter()
    trainer.fit(module, datamodule=data)
    return module.model.eval(), time.perf_counter() - start


def calibration_text(text: Path, n_sequences: int = 32, seq_len: int = 256) -> CalibrationConfig:
    """The first ``n_sequences · seq_len`` tokens of ``text``: inside the training 80 %, never evaluated."""
    return CalibrationConfig(files=[str(text)], n_sequences=n_sequences, seq_len=seq_len)


def converted_model(
    source: Path, convert: list[dict], calibration: CalibrationConfig | None = None
) -> CausalLM:
    """The uptraining's starting point itself (the same ``KVForgeLM`` conversion path), untrained."""
    module = KVForgeLM(init_from=str(source), convert=convert or None, calibration=calibration)
    module.configure_model()
    return module.model.to("cuda" if torch.cuda.is_available() else "cpu").eval()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    convert = parse_convert(args.convert)
    source_dir, text = SHARED / "stories260K-mha", SHARED / "corpora" / "tinystories_val_prefix.txt"
    calibration = calibration_text(text) if args.calibrate else None
    data = TextDataModule(
        sources=[{"files": [str(text)]}],
        block_size=args.block,
        batch_size=args.batch,
        val_fraction=0.2,
    )
    source = load_pretrained(source_dir)
    data.build(source.config, str(source_dir))
    zero_shot = windowed_nll(converted_model(source_dir, convert, calibration), data.val_tokens()).mean
    reference = CausalLM(source.config)
    reference.load_state_dict(source.state_dict)
    source_loss = windowed_nll(reference, data.val_tokens()).mean
    rows = [
        ["source (stories260K-mha)", "-", f"{source_loss:.4f}", "0.0 %", "-"],
        [
            f"{args.convert} zero-shot",
            "-",
            f"{zero_shot:.4f}",
            f"{100 * (zero_shot / source_loss - 1):+.1f} %",
            "-",
        ],
    ]
    for name in args.variants.split(","):
        alpha, kv_first = VARIANTS[name]
        run = Uptraining(args.steps, args.lr, args.warmup, alpha, args.temperature, kv_first, args.threads)
        model, seconds = uptrain(source_dir, convert, data, run, calibration)
        loss = windowed_nll(model, data.val_tokens(), window=512).mean
        rows.append(
            [
                name,
                f"{args.steps}",
                f"{loss:.4f}",
                f"{100 * (loss / source_loss - 1):+.1f} %",
                f"{seconds:.0f}",
            ]
        )
    columns = ["run", "steps", "eval loss", "vs source", "train s"]
    title = f"Uptraining recipe (TARGETS.md), {args.batch}×{args.block} tokens/step, lr {args.lr}"
    print_table(title, columns, rows, markdown=args.markdown)


if __name__ == "__main__":
    main()
