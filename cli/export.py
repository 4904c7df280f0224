"""Write a model directory or a training checkpoint as a stock Hugging Face class, or as a kvforge-typed
directory.

    kvforge export SRC OUT [--family auto] [--dtype bf16] [--overwrite] [--max-shard-size 5GB]
    kvforge export SRC OUT.gguf --format gguf [--outtype f32|f16|bf16|q8_0]

SRC is a Hugging Face directory (Llama, Mistral, Qwen2, Qwen3, DeepSeek-V2/V3) or a kvforge-typed
one. With --family auto the model goes to the simplest stock class that holds it: Llama (GQA/MHA/MQA,
global attention), Mistral (one window on every layer), Qwen3 (q/k norm), Qwen2 (per-layer windows,
q/k/v biases), DeepSeek-V3 (MLA). Those load with transformers' AutoModelForCausalLM (no remote code),
vLLM and SGLang. Anything else (cross-layer K/V sharing, mixed MLA/GQA layers, different windows per
layer, kvforge's MLA generalisations) is written kvforge-typed: it loads only with
trust_remote_code=True where kvforge is installed, and stock servers will NOT load it; the command
says so. Tokenizer files and generation_config.json are copied from SRC. OUT is built next to its
final place and renamed into it: nothing partial is left on failure.

SRC may also be a training checkpoint: a Lightning ``.ckpt`` file or the distributed-checkpoint directory an
FSDP2 run writes in its place (``runs/<name>/checkpoints/last.ckpt``). A checkpoint is exported with the
tokenizer its run used, in bf16 when the run trained in bf16 (``--dtype`` overrides), reading the weights
only (never the optimizer state); nothing in it is unpickled beyond tensors and plain containers
(``weights_only=True``).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from rich.console import Console

from kvforge.conversion import load_config, load_pretrained, plan_export, save_pretrained
from kvforge.conversion.gguf import export_gguf
from kvforge.conversion.loading import is_training_checkpoint, open_checkpoint
from kvforge.conversion.serving_lint import lint_serving
from kvforge.conversion.tokenizer_check import tokenizer_mismatch
from kvforge.conversion.weights import weight_shards
from kvforge.training.export import export_checkpoint

# The families' names as --family choices; a test checks them against FAMILIES.
FAMILY_CHOICES = (
    "auto",
    "deepseek_v2",
    "deepseek_v3",
    "gemma2",
    "gemma3_text",
    "kvforge",
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
)


def add_output_arguments(parser: argparse._ActionsContainer, dtype_help: str) -> None:
    """``--dtype`` and ``--overwrite``, the same two flags in every command that writes a model to OUT."""
    parser.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default=None, help=dtype_help)
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists (atomically)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", metavar="SRC", help="model directory to read (HF or kvforge-typed)")
    parser.add_argument("out", metavar="OUT", help="directory to write; must not exist unless --overwrite")
    parser.add_argument(
        "--family",
        default="auto",
        choices=FAMILY_CHOICES,
        help="target family (default auto: the simplest stock class that holds the model, else kvforge-typed); "
        "a named family that cannot hold the model is an error that lists the ones that can",
    )
    add_output_arguments(
        parser,
        dtype_help="store floating-point tensors in this dtype (default: keep the dtype SRC has; a training "
        "checkpoint: bf16 when its run trained in bf16)",
    )
    parser.add_argument(
        "--allow-pickle",
        action="store_true",
        help="read pickle weights (pytorch_model.bin) with torch.load(weights_only=True); off by default",
    )
    parser.add_argument(
        "--format",
        choices=("hf", "gguf"),
        default="hf",
        help="hf (default): a Hugging Face directory; gguf: one llama.cpp GGUF file OUT (tokenizer and chat "
        "template in its metadata; forms llama.cpp has no architecture for are refused)",
    )
    parser.add_argument(
        "--outtype",
        choices=("f32", "f16", "bf16", "q8_0"),
        default="f32",
        help="--format gguf: type of the matrices (vectors stay f32; default f32)",
    )
    parser.add_argument(
        "--max-shard-size",
        default="5GB",
        help="largest safetensors file before the weights are split into shards (default 5GB)",
    )


def run(args: argparse.Namespace) -> int:
    src = Path(args.src)
    if is_training_checkpoint(src):
        return run_checkpoint(args)
    if Path(args.out).exists() and not args.overwrite:  # fail before the (possibly long) read
        raise FileExistsError(f"{args.out} already exists; pass --overwrite to replace it")
    console = Console(highlight=False)
    config, source_family, weights = open_source(src, args.allow_pickle)
    if args.format == "gguf":
        return export_gguf_command(args, config, weights, console)
    plan = plan_export(config, None if args.family == "auto" else args.family)
    family = plan.family
    console.print(f"Read {src}: {source_family}, {config.n_layers} layers, {config.d_model} wide")
    out = save_quietly(
        config,
        weights,
        args.out,
        family=family.model_type,
        tokenizer_from=src,
        overwrite=args.overwrite,
        dtype=args.dtype,
        max_shard_size=args.max_shard_size,
        progress=True,
    )
    console.print(f"Wrote {out} as {family.architecture} (model_type {family.model_type!r})")
    if family.stock:
        findings = lint_serving(out)
        verdict = "passes" if not findings else f"{len(findings)} finding(s)"
        console.print(
            "Stock class: loads with transformers AutoModelForCausalLM (no remote code); vLLM/SGLang config "
            f"check (keys their loaders read; no engine was run): {verdict}"
        )
        for finding in findings:
            console.print(f"[bold {'red' if finding.level == 'error' else 'yellow'}]{finding}[/]")
        if mismatch := tokenizer_mismatch(src, out):
            console.print(f"[bold red]WARNING:[/] {mismatch}")
    for note in plan.notes:
        style = "bold yellow" if family.stock else "bold red"
        console.print(f"[{style}]{'note' if family.stock else 'WARNING'}:[/] {note}")
    return 0


def run_checkpoint(args: argparse.Namespace) -> int:
    """A training checkpoint (a ``.ckpt`` file or an FSDP2 directory) exported with its run's tokenizer."""
    src = Path(args.src)
    out = export_checkpoint(
        src,
        args.out,
        overwrite=args.overwrite,
        dtype=args.dtype,
        family=None if args.family == "auto" else args.family,
        max_shard_size=args.max_shard_size,
    )
    print(f"Exported the training checkpoint {src} to {out}")
    return 0


def open_source(src: Path, allow_pickle: bool):
    """``(config, family name, weights)`` of a model directory. Safetensors weights stay on disk, read
    tensor by tensor as the export writes them (headers and shapes checked first); pickle weights are
    read whole (``torch.load`` has no partial read). Either way a NaN/inf weight is an error naming it."""
    load_config(src)  # a missing or unreadable config.json is the first thing to say
    if any(Path(file).suffix == ".safetensors" for file in weight_shards(src, allow_pickle=allow_pickle)):
        weights = open_checkpoint(src)  # NaN/inf refused, as every command does
        return weights.config, weights.family.model_type, weights
    pretrained = load_pretrained(src, allow_pickle=allow_pickle, progress=True)
    return pretrained.config, pretrained.family, pretrained.state_dict


def save_quietly(config, state_dict, out, **options) -> Path:
    """``save_pretrained`` with its export notes kept out of the log: the CLIs print ``plan.notes`` styled."""
    logger = logging.getLogger("kvforge.conversion")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        return save_pretrained(config, state_dict, out, **options)
    finally:
        logger.setLevel(level)


def export_gguf_command(args: argparse.Namespace, config, weights, console) -> int:
    """``--format gguf``: :func:`kvforge.conversion.gguf.export_gguf` on the source."""
    family = None if args.family == "auto" else args.family
    out, said = export_gguf(
        config,
        weights,
        args.out,
        outtype=args.outtype,
        tokenizer_from=args.src,
        family=family,
        overwrite=args.overwrite,
    )
    console.print(f"Wrote {out} ({out.stat().st_size:,} bytes): " + "; ".join(said))
    console.print("Runs in llama.cpp / llama-cpp-python / Ollama (this file format is what they load).")
    return 0
