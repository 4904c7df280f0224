"""``kvforge export``: a model directory or a training checkpoint, as a Hugging Face directory.

    kvforge export SRC OUT [--family auto] [--dtype bf16] [--overwrite] [--max-shard-size 5GB]

SRC is what ``kvforge.conversion.cli_export`` reads (an HF or kvforge-typed model directory, see its
options), or a training checkpoint: a Lightning ``.ckpt`` file or the distributed-checkpoint directory an
FSDP2 run writes in its place (``runs/<name>/checkpoints/last.ckpt``). A checkpoint is exported with the
tokenizer its run used; nothing in it is unpickled beyond tensors and plain containers
(``weights_only=True``).
"""

from __future__ import annotations

import argparse
import pickle
from pathlib import Path

MODEL_PREFIX = "model."
CHECKPOINT_KEY = "kvforge"
DCP_METADATA = "meta.pt"  # what Lightning writes next to the shards of a distributed checkpoint


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from kvforge.conversion import cli_export

    cli_export.add_arguments(parser)


def is_training_checkpoint(path: Path) -> bool:
    return path.is_file() or (path.is_dir() and (path / DCP_METADATA).is_file())


def run(args: argparse.Namespace) -> int:
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


def load_training_checkpoint(path: str | Path) -> tuple:
    """``(ModelConfig, model state dict, tokenizer directory or None)`` of a kvforge training checkpoint."""
    import torch

    from kvforge.arch import ModelConfig

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        checkpoint = (
            _load_distributed(path)
            if path.is_dir()
            else torch.load(path, map_location="cpu", weights_only=True)
        )
    except (pickle.UnpicklingError, RuntimeError, EOFError) as err:
        raise ValueError(f"{path} is not a readable PyTorch checkpoint ({err})") from err
    if not isinstance(checkpoint, dict) or CHECKPOINT_KEY not in checkpoint:
        raise ValueError(f"{path} is not a kvforge training checkpoint (no {CHECKPOINT_KEY!r} entry)")
    meta = checkpoint[CHECKPOINT_KEY]
    state = {
        name.removeprefix(MODEL_PREFIX): tensor
        for name, tensor in checkpoint["state_dict"].items()
        if name.startswith(MODEL_PREFIX)
    }
    return ModelConfig.from_dict(meta["model_config"]), state, meta.get("tokenizer_dir")


def export_model(config, state_dict: dict, out: str | Path, tokenizer_dir: str | None, **options) -> Path:
    """``save_pretrained`` with the run's tokenizer; ``options`` are its keyword options (family, dtype, ...)."""
    from kvforge.conversion import save_pretrained

    if tokenizer_dir is not None and not Path(tokenizer_dir).is_dir():
        raise FileNotFoundError(f"the run's tokenizer directory {tokenizer_dir} no longer exists")
    return save_pretrained(config, state_dict, out, tokenizer_from=tokenizer_dir, **options)


def export_checkpoint(checkpoint: str | Path, out: str | Path, **options) -> Path:
    config, state, tokenizer_dir = load_training_checkpoint(checkpoint)
    return export_model(config, state, out, tokenizer_dir, **options)


def _load_distributed(path: Path) -> dict:
    """Lightning's FSDP2 checkpoint: ``meta.pt`` (everything but the sharded tensors) + DCP shards."""
    import tempfile

    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    checkpoint = torch.load(path / DCP_METADATA, map_location="cpu", weights_only=True)
    with tempfile.TemporaryDirectory() as tmp:
        merged = Path(tmp) / "state.pt"
        dcp_to_torch_save(path, merged)
        checkpoint["state_dict"] = torch.load(merged, map_location="cpu", weights_only=True)["state_dict"]
    return checkpoint
