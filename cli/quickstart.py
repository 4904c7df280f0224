"""Uptrain a real checkpoint into a smaller KV cache on CPU, in a few minutes:

    kvforge quickstart                       (= make quickstart)

1. stories260K-mha (a trained 8-head MHA Llama from ../shared/data) is converted to GQA with 2 K/V
   heads (4x less KV cache) by kvforge's aligned, calibrated head merge (``to_gqa``);
2. ``python train.py fit --config configs/uptrain/gqa2.yaml`` uptrains it with distillation from the
   unconverted model on the first 80 % of the TinyStories text (progress bar, falling loss);
3. the loss on the last 20 % (512-token windows) is measured before conversion, after it and after
   uptraining; the run is exported as a Hugging Face directory and stock ``transformers`` tells a story.
"""

from __future__ import annotations

import argparse
import math
import os
import warnings
from pathlib import Path

import torch
import transformers
from rich.console import Console
from rich.table import Table

from kvforge.arch import kv_bytes_per_token
from kvforge.arch.evaluate import windowed_nll
from kvforge.training.lightning_cli import KVForgeCLI
from kvforge.training.module import KVForgeLM

DEFAULT_SHARED = os.environ.get("KVFORGE_SHARED_DATA", "../shared/data")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", default="configs/uptrain/gqa2.yaml", help="train.py config of the uptraining"
    )
    parser.add_argument(
        "--shared-data", default=DEFAULT_SHARED, help="folder with stories260K-mha and corpora/"
    )
    parser.add_argument("--name", default="quickstart", help="run name: outputs go to runs/<name>/")
    parser.add_argument("--max-steps", type=int, default=None, help="override the config's trainer.max_steps")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (a 0.3M-parameter model runs best on 1)"
    )
    parser.add_argument("--prompt", default="Once upon a time")


def run(args: argparse.Namespace) -> int:
    shared = Path(args.shared_data)
    source_dir = shared / "stories260K-mha"
    if not source_dir.is_dir():
        raise FileNotFoundError(f"{source_dir} not found: pass --shared-data or set KVFORGE_SHARED_DATA")
    torch.set_num_threads(args.threads)
    console = Console()
    overrides = [
        "--name",
        args.name,
        "--model.init_from",
        str(source_dir),
        "--data.sources",
        f"[{{files: [{shared / 'corpora' / 'tinystories_val_prefix.txt'}]}}]",
    ]
    if args.max_steps is not None:
        overrides += ["--trainer.max_steps", str(args.max_steps)]
    # The CLI is driven from here, with its own arguments (not this command's): Lightning's warning
    # about mixing the two does not apply.
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
    cli = KVForgeCLI(args=["--config", args.config, *overrides], run=False)
    student, data = cli.model, cli.datamodule
    data.build(student.config, student.tokenizer_source)
    held_out = data.val_tokens()
    console.print(
        f"[bold]Held-out text[/]: last {data.val_fraction:.0%} of the tokens ({held_out.numel():,})"
    )

    source = KVForgeLM(init_from=str(source_dir))
    source.configure_model()
    student.configure_model()
    rows = [("source (MHA)", source.config, windowed_nll(source.model, held_out).mean)]
    rows.append(
        (
            "converted: " + _describe(student.hparams["convert"]),
            student.config,
            windowed_nll(student.model, held_out).mean,
        )
    )
    console.print(f"Loss before conversion {rows[0][2]:.4f}, right after it {rows[1][2]:.4f}; uptraining...")

    cli.trainer.fit(student, datamodule=data)
    rows.append(
        (
            f"uptrained {cli.trainer.global_step} steps",
            student.config,
            windowed_nll(student.model, held_out).mean,
        )
    )

    table = Table(title="stories260K-mha, held-out TinyStories loss (512-token windows)")
    for column in ("model", "KV bytes/token", "loss (nats)", "perplexity"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for name, config, loss in rows:
        kv = kv_bytes_per_token(config, config.max_seq_len, "bf16")
        table.add_row(name, f"{kv:,.0f}", f"{loss:.4f}", f"{math.exp(loss):.2f}")
    console.print(table)

    export_dir = Path(cli.trainer.default_root_dir) / "hf"
    tokenizer = transformers.AutoTokenizer.from_pretrained(export_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(export_dir).eval()
    ids = tokenizer(args.prompt, return_tensors="pt").input_ids
    torch.manual_seed(0)
    story = model.generate(ids, max_new_tokens=120, do_sample=True, top_k=20, temperature=0.8, pad_token_id=0)
    console.print(f"[bold]Exported[/] {export_dir} (transformers {type(model).__name__}); a story from it:")
    console.print(tokenizer.decode(story[0], skip_special_tokens=True))
    return 0


def _describe(convert: dict | list) -> str:
    steps = convert if isinstance(convert, list) else [convert]
    return " then ".join(
        step["to"] + "".join(f" {k}={v}" for k, v in step.items() if k != "to") for step in steps
    )
