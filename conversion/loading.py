"""Open a model for inference, the one way every command does it (``kvforge eval``, ``generate``,
``export``): a Hugging Face / kvforge-typed model directory, or a kvforge training checkpoint — a
Lightning ``.ckpt`` file or the distributed-checkpoint directory an FSDP2 run writes in its place -
with its tokenizer (:func:`load_for_eval`).

A checkpoint is read with ``weights_only=True`` (tensors and plain containers only, nothing else is
unpickled) and brings the tokenizer directory its run used. Reading it needs torch only, no Lightning.
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.distributed.checkpoint import FileSystemReader, load
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from transformers import AutoConfig, AutoTokenizer

from kvforge.arch import CausalLM, ModelConfig, parse_dtype

from .checkpoint import CheckpointWeights, checkpoint_entries
from .pretrained import load_config
from .transforms.calibration import build_model
from .weights import JSON_ERRORS

MODEL_PREFIX = "model."  # KVForgeLM holds the CausalLM as ``self.model``
CHECKPOINT_KEY = "kvforge"  # KVForgeLM.on_save_checkpoint's entry: model config + tokenizer directory
DCP_METADATA = "meta.pt"  # what Lightning writes next to the shards of a distributed checkpoint
DCP_PREFIX = "state_dict."  # where Lightning puts the module's tensors in a distributed checkpoint


@dataclass
class ModelWeights:
    """What a model directory or training checkpoint holds."""

    config: ModelConfig
    state_dict: Mapping[str, torch.Tensor]  # a directory's: read from disk one tensor at a time, on access
    tokenizer_dir: Path | None  # where its tokenizer lives (None: it has none)
    family: str  # the HF family of a directory, or "checkpoint"


def is_training_checkpoint(path: Path) -> bool:
    return path.is_file() or (path.is_dir() and (path / DCP_METADATA).is_file())


def load_training_checkpoint(
    path: str | Path, dtype: torch.dtype | str | None = None, lazy: bool = False
) -> tuple[ModelConfig, Mapping[str, torch.Tensor], str | None]:
    """``(ModelConfig, model state dict, tokenizer directory or None)`` of a kvforge training checkpoint.

    Only the model's weights are read: from a ``.ckpt`` file memory-mapped (the optimizer state in it is
    never touched), from a distributed checkpoint a group of tensors at a time (``read_dcp_weights``).
    ``dtype`` casts floating-point weights as they are read. ``lazy``: the weights as a
    :class:`CheckpointTensors` mapping that reads (and casts) a tensor or a group only when asked, for an
    export that writes a layer at a time."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        if path.is_dir():
            checkpoint = torch.load(path / DCP_METADATA, map_location="cpu", weights_only=True)
        else:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as err:
        raise ValueError(f"{path} is not a readable PyTorch checkpoint ({err})") from err
    if not isinstance(checkpoint, dict) or CHECKPOINT_KEY not in checkpoint:
        raise ValueError(f"{path} is not a kvforge training checkpoint (no {CHECKPOINT_KEY!r} entry)")
    meta = checkpoint[CHECKPOINT_KEY]
    target = parse_dtype(dtype) if dtype is not None else None
    weights = CheckpointTensors(path, checkpoint.get("state_dict"), target)
    state = weights if lazy else weights.read_many(list(weights))
    return ModelConfig.from_dict(meta["model_config"]), state, meta.get("tokenizer_dir")


class CheckpointTensors(Mapping):
    """The model weights of a training checkpoint (kvforge names, ``model.`` removed), read when asked:
    from the memory-mapped state dict of a ``.ckpt`` file, or from a distributed checkpoint's shards (a
    group in one read, :meth:`read_many`). Floating-point tensors are cast to ``dtype`` as they are read."""

    def __init__(self, path: Path, mapped: dict | None, dtype: torch.dtype | None) -> None:
        self.path, self.dtype, self.mapped = path, dtype, mapped
        if path.is_dir():
            entries = FileSystemReader(path).read_metadata().state_dict_metadata.items()
            self.shapes = {
                name.removeprefix(DCP_PREFIX + MODEL_PREFIX): (entry.size, entry.properties.dtype)
                for name, entry in entries
                if name.startswith(DCP_PREFIX + MODEL_PREFIX) and isinstance(entry, TensorStorageMetadata)
            }
        else:
            mapped = mapped or {}
            self.shapes = {
                name.removeprefix(MODEL_PREFIX): (t.shape, t.dtype)
                for name, t in mapped.items()
                if name.startswith(MODEL_PREFIX)
            }

    def meta(self) -> dict[str, torch.Tensor]:
        return {
            name: _cast(torch.empty(shape, dtype=dtype, device="meta"), self.dtype)
            for name, (shape, dtype) in self.shapes.items()
        }

    def __iter__(self) -> Iterator[str]:
        return iter(self.shapes)

    def __len__(self) -> int:
        return len(self.shapes)

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.read_many([name])[name]

    def read_many(self, names: list[str]) -> dict[str, torch.Tensor]:
        if not self.path.is_dir():
            return {name: _cast(self.mapped[MODEL_PREFIX + name], self.dtype) for name in names}
        keys = [DCP_PREFIX + MODEL_PREFIX + name for name in names]
        read = read_dcp_weights(self.path, self.dtype, keys=keys)
        return {name: read[MODEL_PREFIX + name] for name in names}


def training_precision(path: str | Path) -> str | None:
    """The Lightning precision the checkpoint's run trained with (None: a checkpoint older than the record)."""
    path = Path(path)
    try:
        if path.is_dir():
            checkpoint = torch.load(path / DCP_METADATA, map_location="cpu", weights_only=True)
        else:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, FileNotFoundError):
        return None  # load_training_checkpoint says what is wrong with it
    meta = checkpoint.get(CHECKPOINT_KEY) if isinstance(checkpoint, dict) else None
    return meta.get("precision") if isinstance(meta, dict) else None


def read_dcp_weights(
    path: Path,
    dtype: torch.dtype | str | None = None,
    group_bytes: int = 1 << 30,
    keys: list[str] | None = None,
) -> dict[str, torch.Tensor]:
    """The model weights (``state_dict.*``, or only ``keys``) of a distributed checkpoint, without the
    optimizer state and without merging it anywhere: tensors are read straight from the shards, about
    ``group_bytes`` at a time, and cast to ``dtype`` before the next group is read."""
    prefix, wanted = DCP_PREFIX, None if keys is None else set(keys)
    entries = [
        (name, meta)
        for name, meta in FileSystemReader(path).read_metadata().state_dict_metadata.items()
        if name.startswith(prefix)
        and isinstance(meta, TensorStorageMetadata)
        and (wanted is None or name in wanted)
    ]
    target = parse_dtype(dtype) if dtype is not None else None
    weights: dict[str, torch.Tensor] = {}
    group: dict[str, torch.Tensor] = {}
    size = 0
    for index, (name, meta) in enumerate(entries):
        group[name] = torch.empty(meta.size, dtype=meta.properties.dtype)
        size += group[name].numel() * group[name].element_size()
        if size >= group_bytes or index == len(entries) - 1:
            load(group, storage_reader=FileSystemReader(path), no_dist=True)
            weights.update({key.removeprefix(prefix): _cast(t, target) for key, t in group.items()})
            group, size = {}, 0
    return weights


def _cast(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor


def load_weights(path: str | Path) -> ModelWeights:
    """A model directory (``config.json`` + weights) or a training checkpoint, on the CPU."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"{path} does not exist (expected a model directory, a .ckpt file or an FSDP2 checkpoint directory)"
        )
    if is_training_checkpoint(path):
        config, state_dict, tokenizer_dir = load_training_checkpoint(path)
        return ModelWeights(config, state_dict, Path(tokenizer_dir) if tokenizer_dir else None, "checkpoint")
    load_config(path)  # first: a directory without config.json is no model directory
    # lazy: build_model reads one tensor at a time into the model, never the whole stored copy beside it
    weights = open_checkpoint(path)
    return ModelWeights(weights.config, weights, path, weights.family.model_type)


def open_checkpoint(path: str | Path, check_finite: bool = True) -> CheckpointWeights:
    """A model directory's weights as a lazy read-only mapping: headers validated, the config's sizes
    checked against them, every shape checked against the config, each tensor read from disk only when
    asked for (NaN/inf refused unless not ``check_finite``)."""
    entries = checkpoint_entries(path)
    config, family, hf = load_config(path, entries)
    return CheckpointWeights(path, config, family, hf, entries, check_finite)


def resolve_device(device: str | torch.device | None) -> torch.device:
    """None/``auto`` = CUDA when available, else CPU; CUDA asked for without CUDA is an error."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={str(device)!r} but CUDA is not available (allowed here: 'cpu', 'auto')")
    return device


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto`` = bf16 on CUDA, fp32 on CPU (where bf16 matmuls are slow); else ``parse_dtype``."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return parse_dtype(dtype)


def has_tokenizer(path: str | Path) -> bool:
    path = Path(path)
    return any((path / name).is_file() for name in ("tokenizer.json", "tokenizer.model", "vocab.json"))


def load_tokenizer(source: str | Path | None, *, optional: bool = False):
    """A fast tokenizer from a local directory (or a hub name when online); never runs remote code.
    ``optional``: None when there is no directory or it holds no tokenizer files (else an error)."""
    if optional and (source is None or not has_tokenizer(source)):
        return None
    if Path(source).is_dir() and not has_tokenizer(source):
        raise FileNotFoundError(f"data.tokenizer: {source} has no tokenizer.json / tokenizer.model")
    try:
        return AutoTokenizer.from_pretrained(str(source), trust_remote_code=False, **_model_type_only(source))
    except OSError as err:
        raise FileNotFoundError(f"data.tokenizer={str(source)!r}: cannot load a tokenizer ({err})") from err
    except (
        Exception
    ) as err:  # broken tokenizer files: the parsers (JSON, tokenizers' Rust) raise their own types
        why = " ".join(str(err).split())
        raise ValueError(
            f"{source}: its tokenizer files cannot be read ({type(err).__name__}: {why})"
        ) from err


def _model_type_only(source: str | Path) -> dict:
    """``config=``: the default config of the directory's model_type. AutoTokenizer otherwise builds the
    whole config.json with transformers, so a value kvforge never reads (``layer_types=-1`` on a Llama)
    would fail the tokenizer; the tokenizer class depends on the model_type alone."""
    try:
        model_type = json.loads((Path(source) / "config.json").read_text()).get("model_type")
        return {"config": AutoConfig.for_model(model_type)}
    except (
        OSError,
        *JSON_ERRORS,
        AttributeError,
        TypeError,
    ):  # no or no such model_type: transformers decides
        return {}


@dataclass
class EvalModel:
    """A model ready to evaluate or generate with, and the tokenizer its text tasks need (None when it
    has none)."""

    name: str
    model: CausalLM
    tokenizer: object | None
    source: Path
    family: str  # the HF family of a directory, "checkpoint" for a training checkpoint


def load_for_eval(
    path: str | Path,
    *,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype = "fp32",
    tokenizer: str | Path | None = None,
    name: str | None = None,
    backend: str | None = None,
) -> EvalModel:
    """A model directory or a training checkpoint, in eval mode on ``device`` in ``dtype``; ``tokenizer``
    overrides its own, ``backend`` its attention backend."""
    path = Path(path)
    weights = load_weights(path)
    config = weights.config.replace(attention_backend=backend) if backend else weights.config
    model = build_model(config, weights.state_dict, dtype=parse_dtype(dtype), device=resolve_device(device))
    model.requires_grad_(True)  # trainable, as CausalLM is (kvforge eval's passkey fine-tuning trains a copy)
    return EvalModel(
        name=name or path.name,
        model=model,
        tokenizer=load_tokenizer(tokenizer or weights.tokenizer_dir, optional=True),
        source=path,
        family=weights.family,
    )
