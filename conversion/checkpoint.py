"""A model directory's safetensors weights, validated from their headers and read one tensor at a time.

Nothing large is allocated before the headers are checked: every tensor's dtype, shape and byte
range must be consistent with each other and lie inside its file, the shard index (if any) must
name files inside the directory and agree with what the files hold, and the shapes must match the
config (``check_tensors`` on meta tensors). A tensor is then read with one ``readinto`` into a buffer
of exactly its size (no mmap kept open, so resident memory is what the caller holds), checked for
non-finite values, and handed over in kvforge's layout (the family's tensor layout undone).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from kvforge.arch import CausalLM, ModelConfig

from .weights import (
    JSON_ERRORS,
    SAFETENSORS,
    SAFETENSORS_DTYPES,
    SAFETENSORS_INDEX,
    refuse_non_finite,
    weight_shards,
)

MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit
EMBEDDINGS, LM_HEAD = "model.embed_tokens.weight", "lm_head.weight"


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lives: its file, dtype, shape and absolute byte range in the file."""

    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def read_header(path: str | Path) -> dict[str, TensorEntry]:
    """The tensors a safetensors file declares, refused unless every entry is consistent and inside the file."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise ValueError(f"{path}: not a valid safetensors file ({size} bytes, no header); truncated?")
        length = int.from_bytes(prefix, "little")
        if length > min(MAX_HEADER_BYTES, size - 8):
            raise ValueError(
                f"{path}: not a valid safetensors file (header of {length} bytes in a {size}-byte file); truncated?"
            )
        try:
            header = json.loads(handle.read(length))
        except JSON_ERRORS as err:
            raise ValueError(f"{path}: not a valid safetensors file (header is not JSON: {err})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: not a valid safetensors file (header is not an object)")
    data_start, entries = 8 + length, {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        entries[name] = _entry(path, name, info, data_start, size)
    return entries


def _entry(path: Path, name: str, info: object, data_start: int, size: int) -> TensorEntry:
    where = f"{path}: tensor {name!r}"
    if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
        raise ValueError(f"{where}: header entry {info!r} needs dtype, shape and data_offsets")
    dtype = SAFETENSORS_DTYPES.get(info["dtype"])
    if dtype is None:
        raise ValueError(
            f"{where}: dtype {info['dtype']!r} is not supported (allowed: {sorted(SAFETENSORS_DTYPES)})"
        )
    shape, offsets = info["shape"], info["data_offsets"]
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise ValueError(f"{where}: shape {shape!r} must be a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
        raise ValueError(f"{where}: data_offsets {offsets!r} must be two integers")
    begin, end = data_start + offsets[0], data_start + offsets[1]
    expected = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if not data_start <= begin <= end or end - begin != expected:
        raise ValueError(
            f"{where}: data_offsets {offsets} hold {end - begin} bytes; {shape} {dtype} needs {expected}"
        )
    if end > size:
        raise ValueError(f"{where}: ends at byte {end} but the file has {size}; truncated download?")
    return TensorEntry(path, dtype, tuple(shape), begin, end)


def read_entry(
    entry: TensorEntry, name: str, check_finite: bool = True, into: torch.Tensor | None = None
) -> torch.Tensor:
    """Read one tensor into a buffer of its exact size; non-finite values are an error naming it (unless
    ``check_finite`` is False: a tensor already scanned). ``into``: a contiguous uint8 CPU
    tensor of at least ``entry.nbytes`` (its start aligned to the element size) that is read into
    instead of a new buffer; the result is then a view of it."""
    if into is None:
        buffer = torch.empty(entry.nbytes, dtype=torch.uint8)
    elif (
        into.dtype != torch.uint8
        or into.device.type != "cpu"
        or not into.is_contiguous()
        or into.numel() < entry.nbytes
    ):
        raise ValueError(
            f"read_entry: into must be a contiguous uint8 CPU tensor of at least {entry.nbytes} bytes"
        )
    else:
        buffer = into[: entry.nbytes]
    with open(entry.file, "rb") as handle:
        handle.seek(entry.begin)
        if handle.readinto(buffer.numpy()) != entry.nbytes:
            raise ValueError(f"{entry.file}: tensor {name!r} is cut short; truncated download?")
    tensor = buffer.view(entry.dtype).reshape(entry.shape)
    if check_finite:
        refuse_non_finite(tensor, name, entry.file)
    return tensor


def checkpoint_entries(root: str | Path) -> dict[str, TensorEntry]:
    """Every tensor of a directory's safetensors weights (single file or sharded), validated."""
    root = Path(root)
    shards = weight_shards(root)
    if not any(Path(file).suffix == ".safetensors" for file in shards):
        raise ValueError(
            f"{root}: streaming conversion reads safetensors only ({SAFETENSORS} or {SAFETENSORS_INDEX}); "
            "export the model with `kvforge export` first"
        )
    entries: dict[str, TensorEntry] = {}
    for file, expected in shards.items():
        found = read_header(file)
        if expected is not None:
            missing = sorted(set(expected) - set(found))
            if missing:
                raise ValueError(
                    f"{file}: the index lists {missing[:5]} (of {len(missing)}) in this shard but it lacks them"
                )
            found = {name: found[name] for name in expected}
        for name in found:
            if name in entries:
                raise ValueError(f"{file}: tensor {name!r} is also stored in {entries[name].file}")
        entries.update(found)
    return entries


def layer_count(entries: Mapping[str, TensorEntry]) -> int:
    """1 + the highest ``model.layers.N`` index the weights hold (0 without layers)."""
    indices = [name.split(".")[2] for name in entries if name.startswith("model.layers.")]
    return 1 + max((int(i) for i in indices if i.isdigit()), default=-1)


def check_config_sizes(hf: dict, entries: Mapping[str, TensorEntry], where: str) -> None:
    """The sizes config.json declares must be the ones the weights' headers have, checked on the raw
    JSON before any model (or even a list of layers) is built from it: a config claiming a billion
    layers or a vocabulary of 10^12 is refused in microseconds instead of allocating without bound."""
    found: dict[str, int] = {"num_hidden_layers": layer_count(entries)}
    if EMBEDDINGS in entries and len(entries[EMBEDDINGS].shape) == 2:
        found["vocab_size"], found["hidden_size"] = entries[EMBEDDINGS].shape
    gate = entries.get("model.layers.0.mlp.gate_proj.weight")
    if gate is not None and len(gate.shape) == 2:
        found["intermediate_size"] = gate.shape[0]
    for key, size in found.items():
        declared = hf.get(key)
        if declared is not None and declared != size:
            raise ValueError(
                f"{where}: config.json has {key}={declared!r} but the weights hold {size} "
                f"({EMBEDDINGS if key in ('vocab_size', 'hidden_size') else 'their tensor names/shapes'}); "
                "the config does not describe these weights"
            )


def check_tensors(config: ModelConfig, tensors: dict[str, torch.Tensor], where: str) -> None:
    """Every tensor the model needs is there with the right shape, and nothing else."""
    with torch.device("meta"):
        model = CausalLM(config).state_dict()
    expected = {name: tuple(t.shape) for name, t in model.items()}
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = [
        f"{name} {tuple(tensors[name].shape)} (config implies {shape})"
        for name, shape in expected.items()
        if name in tensors and tuple(tensors[name].shape) != shape
    ]
    # weights stored as integers or bools would be cast into numbers no model was trained with
    not_float = [
        f"{name} {str(tensors[name].dtype).removeprefix('torch.')}"
        for name, t in model.items()
        if name in tensors and t.is_floating_point() and not tensors[name].is_floating_point()
    ]
    problems = []
    for label, names in (
        ("missing tensors", missing),
        ("unexpected tensors", unexpected),
        ("wrong shapes", wrong),
        ("not floating point", not_float),
    ):
        if names:
            shown = ", ".join(names[:6]) + (f", … ({len(names)} in all)" if len(names) > 6 else "")
            problems.append(f"{label}: {shown}")
    if problems:
        raise ValueError(f"{where}: the weights do not match the config - " + "; ".join(problems))


class CheckpointWeights(Mapping):
    """A read-only state dict (kvforge names and layout) whose tensors are read from disk on access.

        Construction reads headers only and checks every shape against ``config``; ``len``/``keys``/``in``
        never touch tensor data; ``check_finite`` refuses NaN/inf when a tensor is first read (the file
    is read-only input: later reads of the same tensor are not scanned again). Tied embeddings answer ``lm_head.weight`` with the embeddings, as
        :func:`~kvforge.conversion.load_pretrained` does."""

    def __init__(
        self,
        root: str | Path,
        config: ModelConfig,
        family,
        hf: dict,
        entries: dict[str, TensorEntry] | None = None,
        check_finite: bool = True,
    ) -> None:
        self.root, self.config, self.family, self.hf = Path(root), config, family, hf
        self.check_finite = check_finite
        self.scanned: set[str] = set()  # names already checked for NaN/inf (passes re-read tensors)
        stored = dict(entries) if entries is not None else checkpoint_entries(root)
        # Keyed by kvforge names; a family that renames (Gemma's norms) reads the stored name back.
        self.entries = {family.kvforge_name(name): entry for name, entry in stored.items()}
        if config.tie_embeddings and EMBEDDINGS in self.entries:
            self.entries[LM_HEAD] = self.entries[EMBEDDINGS]
        check_tensors(config, self.meta(), str(root))

    def meta(self) -> dict[str, torch.Tensor]:
        """Meta tensors of the stored shapes and dtypes (no memory)."""
        return {
            name: torch.empty(entry.shape, dtype=entry.dtype, device="meta")
            for name, entry in self.entries.items()
        }

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.read(name)

    def read(self, name: str, into: torch.Tensor | None = None) -> torch.Tensor:
        """``self[name]``, read into ``into`` (uint8, at least ``entries[name].nbytes``) instead of a new buffer
        when given: the result is then a view of it unless the family reorders the tensor."""
        stored = self.family.hf_name(name)
        scan = self.check_finite and name not in self.scanned
        tensors = {stored: read_entry(self.entries[name], stored, check_finite=scan, into=into)}
        if scan:
            self.scanned.add(name)
        self.family.to_kvforge(tensors, self.config, self.hf)
        return tensors[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def dtype(self) -> torch.dtype:
        """The stored dtype of the floating-point weights (the first one's)."""
        return next(e.dtype for e in self.entries.values() if e.dtype.is_floating_point)

    @property
    def nbytes(self) -> int:
        return sum(
            e.nbytes for name, e in self.entries.items() if name != LM_HEAD or not self.config.tie_embeddings
        )
