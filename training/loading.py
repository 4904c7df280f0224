"""Open a model for inference, the one way every command does it (``kvforge eval``, ``generate``,
``export``): a Hugging Face / kvforge-typed model directory, or a kvforge training checkpoint — a
Lightning ``.ckpt`` file or the distributed-checkpoint directory an FSDP2 run writes in its place.

A checkpoint is read with ``weights_only=True`` (tensors and plain containers only, nothing else is
unpickled) and brings the tokenizer directory its run used.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path

import torch

from kvforge.arch import CausalLM, ModelConfig, parse_dtype

MODEL_PREFIX = "model."  # KVForgeLM holds the CausalLM as ``self.model``
CHECKPOINT_KEY = "kvforge"  # KVForgeLM.on_save_checkpoint's entry: model config + tokenizer directory
DCP_METADATA = "meta.pt"  # what Lightning writes next to the shards of a distributed checkpoint


@dataclass
class ModelWeights:
    """What a model directory or training checkpoint holds."""

    config: ModelConfig
    state_dict: dict[str, torch.Tensor]
    tokenizer_dir: Path | None  # where its tokenizer lives (None: it has none)
    family: str  # the HF family of a directory, or "checkpoint"


def is_training_checkpoint(path: Path) -> bool:
    return path.is_file() or (path.is_dir() and (path / DCP_METADATA).is_file())


def load_training_checkpoint(path: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor], str | None]:
    """``(ModelConfig, model state dict, tokenizer directory or None)`` of a kvforge training checkpoint."""
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


def load_weights(path: str | Path) -> ModelWeights:
    """A model directory (``config.json`` + weights) or a training checkpoint, on the CPU."""
    from kvforge.conversion import load_pretrained

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"{path} does not exist (expected a model directory, a .ckpt file or an FSDP2 checkpoint directory)"
        )
    if is_training_checkpoint(path):
        config, state_dict, tokenizer_dir = load_training_checkpoint(path)
        return ModelWeights(config, state_dict, Path(tokenizer_dir) if tokenizer_dir else None, "checkpoint")
    pretrained = load_pretrained(path)
    return ModelWeights(pretrained.config, pretrained.state_dict, path, pretrained.family)


def resolve_device(device: str) -> torch.device:
    """``auto`` = CUDA when available; an explicit CUDA device without CUDA is refused."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} but CUDA is not available (allowed here: 'cpu', 'auto')")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto`` = bf16 on CUDA, fp32 on CPU (where bf16 matmuls are slow); else ``parse_dtype``."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return parse_dtype(dtype)


def build_model(
    weights: ModelWeights, device: torch.device, dtype: torch.dtype, backend: str | None = None
) -> CausalLM:
    """The eval-mode model holding ``weights`` on ``device`` in ``dtype`` (``backend``: attention override)."""
    config = weights.config.replace(attention_backend=backend) if backend else weights.config
    model = CausalLM(config)
    model.load_state_dict(weights.state_dict)
    return model.to(device=device, dtype=dtype).eval()


def load_tokenizer(path: str | Path | None):
    """The directory's tokenizer (the training data's loader: ``AutoTokenizer``, never remote code), or
    None when there is no directory or it holds no tokenizer files."""
    from .data.tokenizer import has_tokenizer
    from .data.tokenizer import load_tokenizer as load_run_tokenizer

    if path is None or not has_tokenizer(path):
        return None
    return load_run_tokenizer(path)


def _load_distributed(path: Path) -> dict:
    """Lightning's FSDP2 checkpoint: ``meta.pt`` (everything but the sharded tensors) + DCP shards."""
    import tempfile

    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    checkpoint = torch.load(path / DCP_METADATA, map_location="cpu", weights_only=True)
    with tempfile.TemporaryDirectory() as tmp:
        merged = Path(tmp) / "state.pt"
        dcp_to_torch_save(path, merged)
        checkpoint["state_dict"] = torch.load(merged, map_location="cpu", weights_only=True)["state_dict"]
    return checkpoint
