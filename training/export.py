"""``kvforge export``: a model directory or a training checkpoint, as a Hugging Face directory.

    kvforge export SRC OUT [--family auto] [--dtype bf16] [--overwrite] [--max-shard-size 5GB]

SRC is what ``kvforge.conversion.cli_export`` reads (an HF or kvforge-typed model directory, see its
options), or a training checkpoint: a Lightning ``.ckpt`` file or the distributed-checkpoint directory an
FSDP2 run writes in its place (``runs/<name>/checkpoints/last.ckpt``). A checkpoint is exported with the
tokenizer its run used, in bf16 when the run trained in bf16 (``--dtype`` overrides), reading the weights
only (never the optimizer state); nothing in it is unpickled beyond tensors and plain containers
(``weights_only=True``).
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from kvforge.conversion import cli_export

    cli_export.add_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from .loading import is_training_checkpoint

    src = Path(args.src)
    if not is_training_checkpoint(src):
        from kvforge.conversion import cli_export

        return cli_export.run(args)
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


def export_model(config, state_dict: dict, out: str | Path, tokenizer_dir: str | None, **options) -> Path:
    """``save_pretrained`` with the run's tokenizer; ``options`` are its keyword options (family, dtype, ...)."""
    from kvforge.conversion import save_pretrained

    if tokenizer_dir is not None and not Path(tokenizer_dir).is_dir():
        raise FileNotFoundError(f"the run's tokenizer directory {tokenizer_dir} no longer exists")
    return save_pretrained(config, state_dict, out, tokenizer_from=tokenizer_dir, **options)


def export_dtype(precision: str | None) -> str | None:
    """The dtype a run's export is written in by default: bf16 (fp16) for a run that computed in it, else
    the weights' own dtype (None)."""
    precision = str(precision or "")
    if precision.startswith("bf16"):
        return "bf16"
    if precision.startswith("16"):
        return "fp16"
    return None


def export_checkpoint(checkpoint: str | Path, out: str | Path, dtype: str | None = None, **options) -> Path:
    """``dtype`` None = :func:`export_dtype` of the run's precision. Only the weights are read, a decoder
    layer at a time as they are written, cast as they are read (see ``load_training_checkpoint``)."""
    from .loading import load_training_checkpoint, training_precision

    dtype = dtype or export_dtype(training_precision(checkpoint))
    config, state, tokenizer_dir = load_training_checkpoint(checkpoint, dtype, lazy=True)
    return export_model(config, state, out, tokenizer_dir, dtype=dtype, **options)
