"""Open what ``kvforge eval`` is pointed at — a model directory, a Lightning ``.ckpt`` file or an FSDP2
checkpoint directory — through the loader every command shares (:mod:`kvforge.training.loading`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from kvforge.arch import CausalLM, parse_dtype

from ..loading import build_model, load_tokenizer, load_weights, resolve_device


@dataclass
class EvalModel:
    """A model ready to evaluate, with the tokenizer its text tasks need (None when it has none)."""

    name: str
    model: CausalLM
    tokenizer: object | None
    source: Path
    family: str  # the HF family of a directory, "checkpoint" for a training checkpoint


def load_for_eval(
    path: str | Path,
    *,
    device: str = "auto",
    dtype: str = "fp32",
    tokenizer: str | Path | None = None,
    name: str | None = None,
) -> EvalModel:
    """A model directory or a training checkpoint, in eval mode; ``tokenizer`` overrides its own."""
    path = Path(path)
    weights = load_weights(path)
    model = build_model(weights, resolve_device(device), parse_dtype(dtype))
    return EvalModel(
        name=name or path.name,
        model=model,
        tokenizer=load_tokenizer(tokenizer or weights.tokenizer_dir),
        source=path,
        family=weights.family,
    )


__all__ = ["EvalModel", "load_for_eval", "load_tokenizer", "resolve_device"]
