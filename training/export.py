"""Export a training run's model as a Hugging Face directory: the model in memory with the run's
tokenizer (the export callback), or a training checkpoint read a layer at a time (``kvforge export``
on a ``.ckpt`` file or an FSDP2 checkpoint directory)."""

from __future__ import annotations

from pathlib import Path

from kvforge.conversion import save_pretrained
from kvforge.conversion.loading import load_training_checkpoint, training_precision


def export_model(config, state_dict: dict, out: str | Path, tokenizer_dir: str | None, **options) -> Path:
    """``save_pretrained`` with the run's tokenizer; ``options`` are its keyword options (family, dtype, ...)."""
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
    dtype = dtype or export_dtype(training_precision(checkpoint))
    config, state, tokenizer_dir = load_training_checkpoint(checkpoint, dtype, lazy=True)
    return export_model(config, state, out, tokenizer_dir, dtype=dtype, **options)
