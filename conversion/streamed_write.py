"""Write a model's weights as safetensors shards one tensor group at a time, never the whole model at once.

The layout is decided before any tensor is read, from the tensors' shapes and dtypes alone: the export
family's layout is applied to meta tensors, ``huggingface_hub``'s splitter assigns them to files (the
same split it makes of the real tensors), and every file is created at its final size with its header.
The weights are then read one group at a time (one decoder layer, or one tensor outside the layers),
cast, put in the family's layout and written at their offsets, and freed before the next group is read:
host memory is about one layer, whatever the model's size and ``max_shard_size``.

A source is any mapping of kvforge names to tensors: a dict, or a lazy one that reads a tensor when asked
(:class:`~kvforge.conversion.checkpoint.CheckpointWeights`, a training checkpoint, an FSDP2 model gathered
layer by layer). A lazy source offers ``meta()`` (meta tensors of its names: no reading; without it every
tensor is read once for its shape) and may offer ``read_many(names)`` (a group in one read).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import torch
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors import safe_open

from .weights import SAFETENSORS_DTYPES, SAFETENSORS_INDEX

DTYPE_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}  # torch dtype -> safetensors name
# The one sharding rule of every directory kvforge writes (export, convert): a single model.safetensors
# up to this size, else shards of at most this size with an index, split by huggingface_hub as
# transformers' save_pretrained splits (its own default is 50GB since transformers 5; 5GB keeps files
# under the Hub's per-file recommendation).
MAX_SHARD_SIZE = "5GB"


def source_meta(source: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Meta tensors of every name of ``source`` (its own ``meta()`` when it has one: nothing is read)."""
    if hasattr(source, "meta"):
        return dict(source.meta())
    return {name: torch.empty(t.shape, dtype=t.dtype, device="meta") for name, t in source.items()}


def read_many(source: Mapping[str, torch.Tensor], names: list[str]) -> dict[str, torch.Tensor]:
    """``names`` of ``source`` in one read where the source can (``read_many``), else one at a time."""
    if hasattr(source, "read_many"):
        return dict(source.read_many(names))
    return {name: source[name] for name in names}


def tensor_groups(names: Iterable[str]) -> list[list[str]]:
    """Names in the order given, grouped for reading: the tensors of one decoder layer together (a family
    layout may need a layer's tensors side by side), every tensor outside the layers alone."""
    groups: dict[str, list[str]] = {}
    for name in names:
        parts = name.split(".")
        layer = len(parts) > 2 and parts[0] == "model" and parts[1] == "layers" and parts[2].isdigit()
        groups.setdefault(".".join(parts[:3]) if layer else name, []).append(name)
    return list(groups.values())


def _cast(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor


def write_streamed(
    source: Mapping[str, torch.Tensor],
    out: Path,
    to_hf: Callable[[dict[str, torch.Tensor]], None],
    *,
    dtype: torch.dtype | None = None,
    skip: frozenset[str] = frozenset(),
    max_shard_size: int | str = MAX_SHARD_SIZE,
    progress: bool = False,
    meta: dict[str, torch.Tensor] | None = None,
) -> list[Path]:
    """Write ``source`` (minus ``skip``: a tied LM head) into the directory ``out``: ``model.safetensors``
    or, above ``max_shard_size``, shards and ``model.safetensors.index.json``. ``to_hf`` puts a group of
    tensors into the export family's layout in place (renaming, permuting rows, adding tensors); it must
    work group by group, on meta tensors too. Floating-point tensors are stored in ``dtype`` (None: their
    own). ``meta``: :func:`source_meta` of ``source`` when the caller has it. Returns the files written."""
    meta = {name: _cast(t, dtype) for name, t in (meta or source_meta(source)).items() if name not in skip}
    kvforge_names = list(meta)
    to_hf(meta)
    split = split_torch_state_dict_into_shards(meta, max_shard_size=max_shard_size)
    files = {
        filename: _ShardFile(out / filename, {name: meta[name] for name in names})
        for filename, names in split.filename_to_tensors.items()
    }
    where = {name: files[filename] for name, filename in split.tensor_to_filename.items()}
    groups = tensor_groups(kvforge_names)
    if progress and len(groups) > 1:
        from rich.progress import track

        groups = track(groups, description="Writing weights", transient=True)
    for group in groups:
        tensors = {name: _cast(t, dtype) for name, t in read_many(source, group).items()}
        to_hf(tensors)
        for name, tensor in tensors.items():
            if name not in where:
                raise ValueError(f"tensor {name!r} was not in the layout planned from the tensors' shapes")
            where[name].write(name, tensor)
        del tensors
    for file in files.values():
        file.check_complete()
    if split.is_sharded:
        index = {"metadata": {**split.metadata}, "weight_map": split.tensor_to_filename}
        (out / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return [file.path for file in files.values()]


def repack(
    parts: list[tuple[Path, list[str]]], out: Path, max_shard_size: int | str = MAX_SHARD_SIZE
) -> dict[str, str]:
    """Copy the tensors of the safetensors files ``parts`` (``(path, tensor names in the order written)``,
    one layer each, as a converter writes them) into the directory ``out`` as :func:`write_streamed`
    lays the same tensors out: ``model.safetensors``, or shards of at most ``max_shard_size`` and their
    index. One tensor is in memory at a time; each part is removed once copied. Returns the weight map
    (tensor name -> file name)."""
    meta: dict[str, torch.Tensor] = {}
    for path, names in parts:
        with safe_open(path, framework="pt") as handle:
            for name in names:
                view = handle.get_slice(name)
                meta[name] = torch.empty(
                    view.get_shape(), dtype=SAFETENSORS_DTYPES[view.get_dtype()], device="meta"
                )
    split = split_torch_state_dict_into_shards(meta, max_shard_size=max_shard_size)
    files = {
        filename: _ShardFile(out / filename, {name: meta[name] for name in names})
        for filename, names in split.filename_to_tensors.items()
    }
    for path, names in parts:
        with safe_open(path, framework="pt") as handle:
            for name in names:
                files[split.tensor_to_filename[name]].write(name, handle.get_tensor(name))
        path.unlink()
    for file in files.values():
        file.check_complete()
    if split.is_sharded:
        index = {"metadata": {**split.metadata}, "weight_map": split.tensor_to_filename}
        (out / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return dict(split.tensor_to_filename)


class _ShardFile:
    """A safetensors file created at its final size with its header, filled one tensor at a time at the
    offsets the header gives (tensors in the order planned, contiguous, header padded to 8 bytes as
    ``safetensors`` writes it)."""

    def __init__(self, path: Path, meta: dict[str, torch.Tensor]) -> None:
        self.path, self.meta, self.offsets, self.written = path, meta, {}, set()
        header: dict[str, object] = {"__metadata__": {"format": "pt"}}
        position = 0
        for name, tensor in meta.items():
            if tensor.dtype not in DTYPE_NAMES:
                raise ValueError(f"tensor {name!r}: dtype {tensor.dtype} cannot be stored in safetensors")
            size = tensor.numel() * tensor.element_size()
            header[name] = {
                "dtype": DTYPE_NAMES[tensor.dtype],
                "shape": list(tensor.shape),
                "data_offsets": [position, position + size],
            }
            self.offsets[name] = position
            position += size
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)
        self.data_start = 8 + len(encoded)
        with open(path, "wb") as handle:
            handle.write(len(encoded).to_bytes(8, "little"))
            handle.write(encoded)
            handle.truncate(self.data_start + position)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        expected = self.meta[name]
        if tensor.shape != expected.shape or tensor.dtype != expected.dtype:
            raise ValueError(
                f"tensor {name!r}: {tuple(tensor.shape)} {tensor.dtype} read, {tuple(expected.shape)} "
                f"{expected.dtype} expected from its header"
            )
        if name in self.written:
            raise ValueError(f"tensor {name!r} was written twice")
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
        with open(self.path, "r+b") as handle:
            handle.seek(self.data_start + self.offsets[name])
            handle.write(data)
        self.written.add(name)

    def check_complete(self) -> None:
        missing = sorted(set(self.meta) - self.written)
        if missing:
            raise ValueError(
                f"{self.path.name}: tensors {missing[:5]} ({len(missing)} in all) were never written"
            )
