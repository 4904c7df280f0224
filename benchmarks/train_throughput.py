"""Training tokens/s through Lightning: kvforge's ``KVForgeLM`` (every attention form) against
the stock transformers model of the same shape and weights (``benchmarks.stock``), in the same loop (same Trainer settings,
precision, AdamW groups, gradient clipping, batches), measured in one run.

    python -m benchmarks.train_throughput                       # CPU: small shape, fp32
    python -m benchmarks.train_throughput --shape 125m --forms mha,gqa,mqa,mla,cla,swa,mix   # GPU: bf16-mixed

Prints tokens/s, MFU (``arch.flops_per_token`` × tokens/s / the device's peak, where Lightning knows it)
and the ratio to transformers for the forms a stock class expresses (Llama: mha/gqa/mqa; DeepseekV3: mla).
"""

from __future__ import annotations

import argparse
import time

import lightning.pytorch as pl
import torch
import transformers
from lightning.fabric.utilities.throughput import get_available_flops
from torch.utils.data import DataLoader, Dataset

from benchmarks.common import print_table
from benchmarks.stock import build_stock
from kvforge.arch import ModelConfig, flops_per_token
from kvforge.arch.presets import PRESETS, with_form
from kvforge.training.module import KVForgeLM
from kvforge.training.optim import OptimizerConfig, build_optimizer

SHAPES = {
    # the CPU shape of benchmarks/throughput.py
    "small": dict(vocab_size=8192, d_model=256, n_layers=4, n_heads=8, n_kv_heads=2, ffn_dim=704),
    # GPT-2-small-sized, as configs/pretrain/gpu-125m-gqa.yaml
    "125m": dict(vocab_size=32768, d_model=768, n_layers=12, n_heads=12, n_kv_heads=4, ffn_dim=2048),
}
STOCK_FORMS = ("mha", "gqa", "mqa", "mla")  # Llama, or DeepseekV3 for MLA


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shape", choices=sorted(SHAPES), default="small")
    parser.add_argument("--forms", default="gqa", help=f"comma-separated, from {', '.join(PRESETS)}")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=3, help="steps before timing starts")
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--precision", default=None, help="default: bf16-mixed on CUDA, 32-true on CPU")
    parser.add_argument("--compile", action="store_true", help="torch.compile both models")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--markdown", action="store_true")
    return parser.parse_args()


class RandomTokens(Dataset):
    def __init__(self, vocab: int, seq: int, n: int) -> None:
        generator = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, vocab, (n, seq + 1), generator=generator)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[index, :-1], "targets": self.ids[index, 1:]}


class StockLM(pl.LightningModule):
    """The baseline: the stock transformers model (its own loss path) in the same Lightning loop."""

    def __init__(self, model: transformers.PreTrainedModel, optim: OptimizerConfig, steps: int) -> None:
        super().__init__()
        self.model, self.optim, self.steps = model, optim, steps

    def training_step(self, batch, batch_idx):
        targets = batch["targets"]
        return self.model(input_ids=batch["input_ids"], labels=targets, shift_labels=targets).loss

    def configure_optimizers(self):
        optimizer, scheduler = build_optimizer(self.model, self.optim, self.steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class StepTimer(pl.Callback):
    def __init__(self, warmup: int) -> None:
        self.warmup, self.start, self.end = warmup, None, None

    def _now(self, trainer) -> float:
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == self.warmup:
            self.start = self._now(trainer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.end = self._now(trainer)


def tokens_per_second(module: pl.LightningModule, args, precision: str, vocab: int) -> float:
    total = args.warmup + args.steps
    loader = DataLoader(RandomTokens(vocab, args.seq, total * args.batch), batch_size=args.batch)
    timer = StepTimer(args.warmup)
    trainer = pl.Trainer(
        max_steps=total,
        precision=precision,
        gradient_clip_val=1.0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer],
    )
    trainer.fit(module, train_dataloaders=loader)
    return args.steps * args.batch * args.seq / (timer.end - timer.start)


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = torch.cuda.is_available()
    precision = args.precision or ("bf16-mixed" if cuda else "32-true")
    optim = OptimizerConfig(lr=1e-4, schedule="constant", warmup_steps=0, weight_decay=0.1)
    base = ModelConfig(**SHAPES[args.shape], max_seq_len=args.seq)
    device = torch.device("cuda" if cuda else "cpu")
    peak = get_available_flops(device, torch.bfloat16 if precision.startswith("bf16") else torch.float32)
    rows = []
    for form in args.forms.split(","):
        config = with_form(base, form, n_kv_heads=base.n_kv_heads, window=max(1, args.seq // 4))
        torch.manual_seed(0)
        ours = KVForgeLM(model=config, optim=optim, compile=args.compile)
        ours.configure_model()
        flops = flops_per_token(config, args.seq)
        entries = [("kvforge", ours)]
        if form in STOCK_FORMS:
            theirs = build_stock(config)
            theirs.load_state_dict(ours.model.state_dict())  # the same parameter names: the same weights
            entries.insert(
                0, ("transformers", StockLM(torch.compile(theirs) if args.compile else theirs, optim, None))
            )
        measured = {}
        for name, module in entries:
            measured[name] = tokens_per_second(module, args, precision, config.vocab_size)
            mfu = f"{100 * flops * measured[name] / peak:.1f} %" if peak else "-"
            rows.append([form, name, f"{ours.model.num_parameters():,}", measured[name], mfu, ""])
        if "transformers" in measured:
            rows[-1][-1] = f"{measured['kvforge'] / measured['transformers']:.2f}×"
    columns = ["form", "implementation", "parameters", "tokens/s", "MFU", "kvforge / transformers"]
    title = (
        f"Training throughput, {args.shape} shape, {args.batch}×{args.seq} tokens/step, {precision}, "
        f"{'CUDA' if cuda else f'CPU ({torch.get_num_threads()} threads)'}"
    )
    print_table(title, columns, rows, markdown=args.markdown)


if __name__ == "__main__":
    main()
