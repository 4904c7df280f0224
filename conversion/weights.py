"""Reading and writing the weight files of a model directory.

Reading: ``model.safetensors``, or shards listed in ``model.safetensors.index.json``; pickle
``pytorch_model.bin`` (and its index) only when the caller opts in with ``allow_pickle=True``, and
then through ``torch.load(weights_only=True)``. Shard names in an index must stay inside the
directory (no absolute paths, no ``..``). Writing shards with huggingface_hub's splitter, the layout
``from_pretrained`` expects.
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Iterable, Iterator
from pathlib import Path, PurePosixPath, PureWindowsPath

import torch
from safetensors import SafetensorError, safe_open

SAFETENSORS, SAFETENSORS_INDEX = "model.safetensors", "model.safetensors.index.json"
PICKLE, PICKLE_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"
StateDict = dict[str, torch.Tensor]
# What reading a JSON file kvforge was given may raise: invalid JSON or UTF-8 (both ValueErrors), or
# nesting deeper than the interpreter's recursion limit (``[[[[...`` of 100k levels: a RecursionError).
JSON_ERRORS = (ValueError, RecursionError)

# safetensors' dtype names (its header's "dtype" field) -> torch dtypes
SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def _progress(items: list, description: str, enabled: bool) -> Iterable:
    if not enabled or len(items) < 2:
        return items
    from rich.progress import track

    return track(items, description=description, transient=True)


def _shard_path(root: Path, index_file: Path, name: object) -> Path:
    """A shard named by an index, refused unless it is a relative path inside ``root``."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"{index_file}: shard name {name!r} must be a non-empty string")
    posix, windows = PurePosixPath(name), PureWindowsPath(name)
    if posix.is_absolute() or windows.is_absolute() or windows.drive or ".." in posix.parts + windows.parts:
        raise ValueError(
            f"{index_file}: shard name {name!r} points outside the model directory "
            "(absolute paths and '..' are refused)"
        )
    path = root / name
    if not path.resolve().is_relative_to(root.resolve()):
        raise ValueError(f"{index_file}: shard {name!r} resolves outside the model directory (symlink?)")
    if not path.is_file():
        raise FileNotFoundError(f"{index_file} lists shard {name!r}, but {path} does not exist")
    return path


def _read_index(root: Path, index_file: Path) -> dict[str, list[str]]:
    """Shard path → tensor names, from an HF ``*.index.json``."""
    try:
        weight_map = json.loads(index_file.read_text()).get("weight_map")
    except (*JSON_ERRORS, AttributeError) as err:
        raise ValueError(f"{index_file}: not a valid shard index ({err})") from None
    if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(
            f"{index_file}: 'weight_map' must be a non-empty object of tensor name -> shard file"
        )
    shards: dict[str, list[str]] = {}
    for tensor, name in weight_map.items():
        shards.setdefault(str(_shard_path(root, index_file, name)), []).append(tensor)
    return shards


def weight_shards(root: Path, *, allow_pickle: bool = False) -> dict[str, list[str] | None]:
    """Weight files of a directory → the tensors each must hold (None: whatever the file holds)."""
    if (root / SAFETENSORS_INDEX).is_file():
        return _read_index(root, root / SAFETENSORS_INDEX)
    if (root / SAFETENSORS).is_file():
        return {str(root / SAFETENSORS): None}
    pickled = [name for name in (PICKLE_INDEX, PICKLE) if (root / name).is_file()]
    if pickled and not allow_pickle:
        raise ValueError(
            f"{root} has only pickle weights ({pickled[0]}); pickle files can run code when loaded. Pass "
            "allow_pickle=True (CLI: --allow-pickle) to read them with torch.load(weights_only=True), or "
            "convert them to safetensors"
        )
    if (root / PICKLE_INDEX).is_file():
        return _read_index(root, root / PICKLE_INDEX)
    if (root / PICKLE).is_file():
        return {str(root / PICKLE): None}
    raise FileNotFoundError(
        f"{root}: no weights found (looked for {SAFETENSORS}, {SAFETENSORS_INDEX}, {PICKLE}, {PICKLE_INDEX})"
    )


def refuse_non_finite(tensor: torch.Tensor, name: str, file: str | Path) -> None:
    """The one check every reader of model weights makes: NaN/inf is an error naming file and tensor."""
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        bad = int((~torch.isfinite(tensor)).sum())
        raise ValueError(
            f"{file}: tensor {name!r} holds {bad} non-finite values (NaN/inf) of {tensor.numel()}; "
            "the checkpoint is corrupt or diverged - kvforge reads finite weights only"
        )


def _read_file(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    try:
        yield from _read_tensors(path)
    except SafetensorError as err:
        raise ValueError(
            f"{path}: not a valid safetensors file ({err}); truncated or corrupted download?"
        ) from err
    except (RuntimeError, pickle.UnpicklingError) as err:
        if path.suffix != ".bin":
            raise
        raise ValueError(
            f"{path}: cannot be read with torch.load(weights_only=True) ({err}); truncated, corrupted, or it "
            "holds objects other than tensors (which could run code): convert it to safetensors"
        ) from err


def _read_tensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    if path.suffix == ".bin":
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        if not isinstance(state, dict):
            raise ValueError(f"{path}: expected a state dict, got {type(state).__name__}")
        yield from state.items()
        return
    with safe_open(str(path), framework="pt", device="cpu") as handle:
        for name in handle.keys():  # noqa: SIM118 - safe_open has keys(), not iteration
            yield name, handle.get_tensor(name)


def read_weights(root: str | Path, *, allow_pickle: bool = False, progress: bool = False) -> StateDict:
    root = Path(root)
    shards = weight_shards(root, allow_pickle=allow_pickle)
    tensors: StateDict = {}
    for file in _progress(list(shards), "Loading shards", progress):
        loaded = dict(_read_file(Path(file)))
        for name, tensor in loaded.items():
            refuse_non_finite(tensor, name, file)
        expected = shards[file]
        if expected is None:
            tensors.update(loaded)
            continue
        missing = sorted(set(expected) - set(loaded))
        if missing:
            raise ValueError(
                f"{file}: the index lists {missing[:5]} (of {len(missing)}) in this shard but it lacks them"
            )
        tensors.update({name: loaded[name] for name in expected})
    return tensors
