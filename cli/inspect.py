"""Show what a model directory holds: per-layer attention forms, parameters and KV-cache bytes.

    kvforge inspect DIR [--seq-len 4096] [--dtype bf16] [--batch 8] [--shards 8] [--teacher self|DIR]
                    [--activation-checkpointing] [--json] [--config-only]

Reads config.json and the weights' headers (never the tensor data), for HF (Llama, Mistral, Qwen2,
Qwen3, DeepSeek-V2/V3) and kvforge-typed directories. The weight files are validated - every
safetensors header parses and its byte ranges lie inside its file, the shard index names files
inside the directory and agrees with them, every tensor the config implies is there with its shape,
every value is finite (each tensor read once, one at a time) - and the report says whether they match
the config. Exit status 1 after the report for anything else: weights missing, only pickles (never
opened), invalid, mismatched or holding NaN/inf; ``--config-only`` plans from config.json alone and
never looks at the weights (exit 0). The config's
sizes are checked against the headers before anything is built from it. Per layer: the form (mha, gqa-N, mqa, mla), its sliding window, the layer
whose K/V it reads (cross-layer sharing), values cached per token, the fixed state bytes per sequence of
a constant-state layer (linear, deltanet: no per-token cache) and the layer's cache bytes at --seq-len
tokens. Totals: parameters, KV bytes per token (averaged over --seq-len: windows cap what a
layer keeps) and the ratio to the same model with plain multi-head attention on every layer. Memory
(``kvforge.arch.memory``): training per device for micro-batches of --batch × --seq-len tokens (fp32
weights, gradients and AdamW state, --dtype activations, as under ``bf16-mixed``; FSDP2 over --shards
devices; a distillation teacher held in --dtype and sharded the same way; the chunked loss) - what
``MemoryCheck`` counts before a run - and inference (--dtype weights plus the KV cache of --batch
sequences of --seq-len tokens).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from kvforge.arch import CausalLM, describe_layers, kv_bytes_per_token, mha_equivalent
from kvforge.arch.memory import estimate_inference_memory, estimate_training_memory
from kvforge.conversion import load_config
from kvforge.conversion import weights as weight_files
from kvforge.conversion.checkpoint import CheckpointWeights, checkpoint_entries
from kvforge.conversion.pretrained import EMBEDDINGS, LM_HEAD


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dir", metavar="DIR", help="model directory (HF or kvforge-typed)")
    parser.add_argument(
        "--seq-len",
        type=int,
        default=None,
        help="context length for the KV-cache figures (default: the model's max_position_embeddings)",
    )
    parser.add_argument(
        "--dtype", default="bf16", help="cache element type for the byte counts: fp32, bf16, fp16 or fp8"
    )
    parser.add_argument(
        "--batch",
        type=int,
        default=1,
        help="sequences per (micro-)batch for the memory estimates (default 1)",
    )
    parser.add_argument(
        "--shards", type=int, default=1, help="FSDP2 devices the training state is sharded over (default 1)"
    )
    parser.add_argument(
        "--teacher",
        metavar="self|DIR",
        default=None,
        help="count a distillation teacher: this model (self) or another model directory",
    )
    parser.add_argument(
        "--activation-checkpointing", action="store_true", help="training recomputes each decoder layer"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    parser.add_argument(
        "--config-only",
        action="store_true",
        help="plan from config.json alone: the weights are not looked at (exit 0 without any); by default "
        "anything but safetensors weights that match the config and are finite exits 1",
    )


def summarize(
    path: str,
    seq_len: int | None,
    dtype: str,
    batch: int = 1,
    shards: int = 1,
    teacher: str | None = None,
    activation_checkpointing: bool = False,
    config_only: bool = False,
) -> dict:
    """The inspect report as plain data (what --json prints); ``config_only`` never looks at the weights."""
    if config_only:
        weights, entries = {"status": "skipped", "problem": "--config-only: the weights were not read"}, None
    else:
        weights, entries = check_weights(path)
    config, family, hf = load_config(path, entries)  # sizes checked against the headers first
    if entries is not None:
        try:
            stored = CheckpointWeights(path, config, family, hf, entries)
        except ValueError as err:
            weights.update(status="mismatch", problem=str(err))
        else:
            weights.update(scan_finite(stored))
    seq_len = seq_len or config.max_seq_len
    if seq_len <= 0:
        raise ValueError(f"--seq-len={seq_len}: must be a positive number of tokens")
    if batch <= 0:
        raise ValueError(f"--batch={batch}: must be a positive number of sequences")
    training = estimate_training_memory(
        config,
        batch,
        seq_len,
        param_dtype="fp32",
        activation_dtype=dtype,
        shards=shards,
        teacher=(config if teacher == "self" else load_config(teacher)[0]) if teacher else None,
        gradient_checkpointing=activation_checkpointing,
    )
    inference = estimate_inference_memory(config, batch, seq_len, dtype)
    with torch.device("meta"):
        parameters = CausalLM(config).num_parameters()
    per_token = kv_bytes_per_token(config, seq_len, dtype)
    mha_per_token = kv_bytes_per_token(mha_equivalent(config), seq_len, dtype)
    return {
        "path": str(path),
        "model_type": family.model_type,
        "architecture": family.architecture,
        "stock": family.stock,
        "parameters": parameters,
        "seq_len": seq_len,
        "dtype": dtype,
        "kv_bytes_per_token": per_token,
        "mha_kv_bytes_per_token": mha_per_token,
        "kv_ratio_vs_mha": per_token / mha_per_token,
        "layers": describe_layers(config, seq_len, dtype),
        "batch": batch,
        "shards": shards,
        "memory": {"training": _memory(training), "inference": _memory(inference)},
        "weights": weights,
    }


def check_weights(path: str) -> tuple[dict, dict | None]:
    """The weight files' status (``match``, ``mismatch``, ``invalid``, ``none``) and their validated
    headers (None unless readable)."""
    names = (
        weight_files.SAFETENSORS,
        weight_files.SAFETENSORS_INDEX,
        weight_files.PICKLE,
        weight_files.PICKLE_INDEX,
    )
    if not any((Path(path) / name).exists() for name in names):
        problem = "no weight files (pass --config-only to plan from config.json alone)"
        return {"status": "none", "problem": problem}, None
    try:
        files = weight_files.weight_shards(Path(path), allow_pickle=True)
    except (ValueError, FileNotFoundError) as err:
        return {"status": "invalid", "problem": str(err)}, None
    if any(Path(file).suffix == ".bin" for file in files):
        problem = (
            "pickle weights (pytorch_model.bin) are never opened by inspect; convert them to safetensors"
        )
        return {"status": "unchecked", "problem": problem, "files": len(files)}, None
    try:
        entries = checkpoint_entries(path)
    except (ValueError, FileNotFoundError, OSError) as err:
        return {"status": "invalid", "problem": str(err), "files": len(files)}, None
    size = sum(Path(file).stat().st_size for file in files)
    return {"status": "match", "files": len(files), "bytes": size, "tensors": len(entries)}, entries


def scan_finite(stored: CheckpointWeights) -> dict:
    """Read every stored tensor once (one in memory at a time) and refuse NaN/inf: ``{}`` when all are
    finite, else the status and the first offending tensor."""
    tied = stored.config.tie_embeddings and EMBEDDINGS in stored.entries
    for name in stored:
        if tied and name == LM_HEAD:  # the embeddings, read already
            continue
        try:
            stored.read(name)
        except ValueError as err:
            return {"status": "nonfinite" if "non-finite" in str(err) else "invalid", "problem": str(err)}
    return {}


def _memory(estimate) -> dict:
    return {**dataclasses.asdict(estimate), "total": estimate.total, "suggestion": estimate.suggestion()}


EXIT_ZERO = ("match", "skipped")
MEMORY_ROWS = (
    ("parameters", "parameters"),
    ("gradients", "gradients"),
    ("optimizer", "optimizer state"),
    ("activations", "activations"),
    ("kv_cache", "KV cache"),
    ("teacher", "teacher"),
    ("loss", "loss chunks"),
    ("gathered", "FSDP2 gathered"),
    ("total", "total"),
)


def _size(value: int) -> str:
    return f"{value / 1024**3:,.3f} GiB" if value >= 1024**3 else f"{value / 1024**2:,.1f} MiB"


def run(args: argparse.Namespace) -> int:
    report = summarize(
        args.dir,
        args.seq_len,
        args.dtype,
        args.batch,
        args.shards,
        args.teacher,
        args.activation_checkpointing,
        args.config_only,
    )
    # 0 only for what inspect vouches for: matching finite safetensors weights, or an explicit plan
    failed = int(report["weights"]["status"] not in EXIT_ZERO)
    if args.json:
        print(json.dumps(report, indent=2))
        return failed
    console = Console(highlight=False)
    table = Table(title=f"{report['path']}: {report['architecture']} ({report['model_type']})")
    stateful = any(row["state_bytes"] for row in report["layers"])  # the column only where it says something
    columns = ["layer", "form", "window", "K/V from", "values/token", f"KV bytes @ {report['seq_len']}"]
    if stateful:
        columns.insert(5, "state bytes")
    for column in columns:
        table.add_column(column, justify="right" if column not in ("form", "K/V from") else "left")
    for row in report["layers"]:
        cells = [
            str(row["layer"]),
            row["form"],
            str(row["window"]) if row["window"] is not None else "-" if row["state_bytes"] else "global",
            f"shared from layer {row['kv_from']}" if row["kv_from"] is not None else "own",
            f"{row['values_per_token']:,}",
            f"{row['bytes']:,}",
        ]
        if stateful:
            cells.insert(5, f"{row['state_bytes']:,}")
        table.add_row(*cells)
    console.print(table)
    console.print(
        f"parameters {report['parameters']:,} · KV cache {report['kv_bytes_per_token']:,.1f} bytes/token "
        f"({report['dtype']}, {report['seq_len']} tokens) · MHA equivalent {report['mha_kv_bytes_per_token']:,.1f} "
        f"· ratio {report['kv_ratio_vs_mha']:.3f}"
    )
    memory = Table(
        title=f"memory: batch {report['batch']} × {report['seq_len']} tokens ({report['dtype']} activations/cache)"
    )
    memory.add_column("")
    for column in (f"training (fp32 weights + AdamW, per device of {report['shards']})", "inference"):
        memory.add_column(column, justify="right")
    training, inference = report["memory"]["training"], report["memory"]["inference"]
    for key, label in MEMORY_ROWS:
        memory.add_row(label, _size(training[key]), _size(inference[key]))
    console.print(memory)
    console.print(f"largest training share: {training['suggestion']}")
    weights = report["weights"]
    if weights["status"] == "match":
        console.print(
            f"weights: {weights['files']} safetensors file(s), {_size(weights['bytes'])}, {weights['tensors']} "
            "tensors - headers valid, they match the config, every value finite"
        )
    else:
        style = "bold yellow" if weights["status"] == "skipped" else "bold red"
        console.print(f"[{style}]weights {weights['status'].upper()}:[/] {weights['problem']}")
    if not report["stock"]:
        console.print(
            "[bold red]kvforge-typed:[/] loads with trust_remote_code=True where kvforge is installed; "
            "stock transformers, vLLM and SGLang will not load it"
        )
    return failed
