"""Export a training checkpoint as a Hugging Face model directory (with the run's tokenizer).

    kvforge export-ckpt runs/<name>/checkpoints/last.ckpt OUT_DIR [--overwrite] [--dtype bf16]

CKPT is a Lightning ``.ckpt`` file or, for FSDP2 runs, the distributed-checkpoint directory Lightning
writes in its place. Nothing is unpickled beyond tensors and plain containers (``weights_only=True``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

MODEL_PREFIX = "model."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="a .ckpt file or an FSDP2 checkpoint directory")
    parser.add_argument("out", help="output model directory")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    parser.add_argument(
        "--dtype", default=None, help="cast the weights (bf16, fp16, fp32); default as trained"
    )


def run(args: argparse.Namespace) -> int:
    out = export_checkpoint(args.checkpoint, args.out, overwrite=args.overwrite, dtype=args.dtype)
    print(f"Exported {args.checkpoint} to {out}")
    return 0


def load_training_checkpoint(path: str | Path) -> tuple:
    """``(ModelConfig, model state dict, tokenizer directory or None)`` of a kvforge training checkpoint."""
    import torch

    from kvforge.arch import ModelConfig

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.is_dir():
        checkpoint = _load_distributed(path)
    else:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if "kvforge" not in checkpoint:
        raise ValueError(f"{path} is not a kvforge training checkpoint (no 'kvforge' entry)")
    meta = checkpoint["kvforge"]
    state = {
        name.removeprefix(MODEL_PREFIX): tensor
        for name, tensor in checkpoint["state_dict"].items()
        if name.startswith(MODEL_PREFIX)
    }
    return ModelConfig.from_dict(meta["model_config"]), state, meta.get("tokenizer_dir")


def export_model(
    config, state_dict: dict, out: str | Path, tokenizer_dir: str | None, *, overwrite: bool
) -> Path:
    from kvforge.conversion import save_pretrained

    if tokenizer_dir is not None and not Path(tokenizer_dir).is_dir():
        raise FileNotFoundError(f"the run's tokenizer directory {tokenizer_dir} no longer exists")
    return save_pretrained(config, state_dict, out, tokenizer_from=tokenizer_dir, overwrite=overwrite)


def export_checkpoint(
    checkpoint: str | Path, out: str | Path, *, overwrite: bool = False, dtype: str | None = None
):
    from kvforge.arch import parse_dtype

    config, state, tokenizer_dir = load_training_checkpoint(checkpoint)
    if dtype is not None:
        target = parse_dtype(dtype)
        state = {
            name: tensor.to(target) if tensor.is_floating_point() else tensor
            for name, tensor in state.items()
        }
    return export_model(config, state, out, tokenizer_dir, overwrite=overwrite)


def _load_distributed(path: Path) -> dict:
    """Lightning's FSDP2 checkpoint: ``meta.pt`` (everything but tensors) + DCP shards of the state."""
    import tempfile

    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    meta_file = path / "meta.pt"
    if not meta_file.is_file():
        raise ValueError(f"{path} is a directory but not a Lightning distributed checkpoint (no meta.pt)")
    checkpoint = torch.load(meta_file, map_location="cpu", weights_only=True)
    with tempfile.TemporaryDirectory() as tmp:
        merged = Path(tmp) / "state.pt"
        dcp_to_torch_save(path, merged)
        checkpoint["state_dict"] = torch.load(merged, map_location="cpu", weights_only=True)["state_dict"]
    return checkpoint
