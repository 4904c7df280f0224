"""Open what ``kvforge eval`` is pointed at: a Hugging Face model directory today, a Lightning
checkpoint once the trainer's format lands (:func:`load_lightning_checkpoint`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from kvforge.arch import CausalLM, parse_dtype
from kvforge.conversion import load_pretrained

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")


@dataclass
class EvalModel:
    """A model ready to evaluate, with the tokenizer its text tasks need (None when it has none)."""

    name: str
    model: CausalLM
    tokenizer: object | None
    source: Path
    family: str


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} but CUDA is not available (allowed here: 'cpu', 'auto')")
    return torch.device(device)


def load_tokenizer(path: str | Path):
    """The directory's tokenizer through ``AutoTokenizer`` (never with remote code), or None."""
    path = Path(path)
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, trust_remote_code=False)


def load_lightning_checkpoint(path: Path) -> tuple[CausalLM, Path | None]:
    """Wire-up point for the Lightning trainer's ``.ckpt`` files: return the model and the directory
    its tokenizer lives in. Until the trainer's checkpoint format lands, refuse with a clear message."""
    raise ValueError(
        f"{path}: Lightning checkpoints (.ckpt) cannot be evaluated yet; export the model to a Hugging "
        "Face directory and pass that directory instead"
    )


def load_for_eval(
    path: str | Path,
    *,
    device: str = "auto",
    dtype: str = "fp32",
    tokenizer: str | Path | None = None,
    name: str | None = None,
) -> EvalModel:
    """A model directory (``config.json`` + ``model.safetensors``) or a ``.ckpt`` file, in eval mode."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist (expected a model directory or a .ckpt file)")
    if path.is_file() and path.suffix == ".ckpt":
        model, tokenizer_dir = load_lightning_checkpoint(path)
        family = "lightning"
    elif path.is_dir():
        pretrained = load_pretrained(path)
        model = CausalLM(pretrained.config)
        model.load_state_dict(pretrained.state_dict)
        tokenizer_dir, family = path, pretrained.family
    else:
        raise ValueError(f"{path} is neither a model directory nor a .ckpt file")
    model = model.to(device=resolve_device(device), dtype=parse_dtype(dtype)).eval()
    tokenizer_source = tokenizer or tokenizer_dir
    return EvalModel(
        name=name or path.name,
        model=model,
        tokenizer=load_tokenizer(tokenizer_source) if tokenizer_source else None,
        source=path,
        family=family,
    )
