"""One sharding rule for every directory kvforge writes: a converter's one-part-per-layer output is
packed exactly as export lays out the same tensors (one file up to the limit, else shards by size)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from kvforge.conversion.streamed_write import repack, write_streamed


def _tensors() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    tensors = {"model.embed_tokens.weight": torch.randn(64, 16)}
    for layer in range(3):
        tensors[f"model.layers.{layer}.self_attn.q_proj.weight"] = torch.randn(16, 16)
        tensors[f"model.layers.{layer}.mlp.up_proj.weight"] = torch.randn(32, 16).to(torch.bfloat16)
    return tensors


def _layout(directory) -> tuple[list[str], dict | None]:
    files = sorted(path.name for path in directory.glob("*.safetensors"))
    index = directory / "model.safetensors.index.json"
    return files, json.loads(index.read_text())["weight_map"] if index.exists() else None


@pytest.mark.parametrize("max_shard_size", ["5GB", 3000, 1])
def test_repacked_parts_are_laid_out_as_export_writes_them(tmp_path, max_shard_size):
    tensors = _tensors()
    exported, converted = tmp_path / "exported", tmp_path / "converted"
    exported.mkdir(), converted.mkdir()
    write_streamed(tensors, exported, lambda group: None, max_shard_size=max_shard_size)
    parts = []  # what a converter writes: the embeddings, then one part per layer
    for number, prefix in enumerate(["model.embed", "model.layers.0.", "model.layers.1.", "model.layers.2."]):
        part = {k: v for k, v in tensors.items() if k.startswith(prefix)}
        parts.append((converted / f"part-{number:05d}.safetensors", list(part)))
        save_file(part, parts[-1][0])
    weight_map = repack(parts, converted, max_shard_size)
    assert _layout(converted) == _layout(exported)
    assert not any(path.exists() for path, _ in parts)
    read = {}
    for name in sorted(set(weight_map.values())):
        read.update(load_file(converted / name))
    assert read.keys() == tensors.keys() and all(torch.equal(read[k], tensors[k]) for k in tensors)
    files, index = _layout(converted)
    assert (files == ["model.safetensors"]) == (index is None) == (max_shard_size == "5GB")
