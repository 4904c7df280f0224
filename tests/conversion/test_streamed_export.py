"""``save_pretrained`` writes one decoder layer at a time into files laid out from the shapes alone; the
directory equals what the in-memory writer (the state dict cast whole, split by huggingface_hub, each
shard saved by safetensors) produces, and the source is never read whole."""

from __future__ import annotations

import json
import weakref
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest
import torch
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors import safe_open
from safetensors.torch import save_file

from kvforge.arch import CausalLM, parse_dtype
from kvforge.conversion import plan_export, save_pretrained
from kvforge.conversion.atomic import atomic_directory
from kvforge.conversion.pretrained import EMBEDDINGS, LM_HEAD, export_config, write_directory_files
from tests.conftest import tiny_form
from tests.conversion.hf_tiny import randomize_


def write_weights(tensors: dict, out: Path, *, max_shard_size: int | str = "5GB") -> None:
    """The in-memory writer: huggingface_hub splits the whole state dict, safetensors saves each shard."""
    tensors = {name: tensor.detach().to("cpu").contiguous().clone() for name, tensor in tensors.items()}
    split = split_torch_state_dict_into_shards(tensors, max_shard_size=max_shard_size)
    for filename, names in split.filename_to_tensors.items():
        save_file({name: tensors[name] for name in names}, out / filename, metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": {**split.metadata}, "weight_map": split.tensor_to_filename}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def reference_save(config, state_dict, out, *, family=None, dtype=None, max_shard_size="5GB") -> Path:
    """The in-memory export this module replaced: every tensor cast at once, then written."""
    chosen = plan_export(config, family).family
    tensors = dict(state_dict)
    if config.tie_embeddings:
        tensors.pop(LM_HEAD, None)
    if dtype is not None:
        tensors = {n: t.to(parse_dtype(dtype)) if t.is_floating_point() else t for n, t in tensors.items()}
    hf = export_config(
        chosen, config, next((t.dtype for t in tensors.values() if t.is_floating_point()), None)
    )
    chosen.to_hf(tensors, config, hf)
    with atomic_directory(out) as tmp:
        write_weights(tensors, tmp, max_shard_size=max_shard_size)
        write_directory_files(tmp, chosen, hf, None)
    return Path(out)


def read_directory(path: Path) -> tuple[dict, dict[str, dict[str, torch.Tensor]]]:
    """(the JSON files, each safetensors file's tensors)."""
    texts = {p.name: json.loads(p.read_text()) for p in sorted(path.glob("*.json"))}
    files = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            files[file.name] = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
    return texts, files


def assert_same_directory(got: Path, expected: Path) -> None:
    got_json, got_files = read_directory(got)
    expected_json, expected_files = read_directory(expected)
    assert got_json == expected_json  # config.json, generation_config.json, the index (names, total_size)
    assert got_files.keys() == expected_files.keys()
    for file, tensors in expected_files.items():
        assert got_files[file].keys() == tensors.keys(), file
        for name, tensor in tensors.items():
            assert got_files[file][name].dtype == tensor.dtype, name
            assert torch.equal(got_files[file][name], tensor), name


CASES = {
    "llama-tied": (lambda: tiny_form("gqa", tie_embeddings=True), None),
    "qwen2-zero-biases": (lambda: tiny_form("swa"), None),  # biases added layer by layer
    "deepseek_v3-permuted-rows": (lambda: tiny_form("mla"), None),
    "kvforge-typed": (lambda: tiny_form("cla"), None),
}


@pytest.mark.parametrize("max_shard_size", ["5GB", "40KB"])
@pytest.mark.parametrize("dtype", [None, "bf16"])
@pytest.mark.parametrize("case", list(CASES))
def test_streamed_export_equals_the_in_memory_export(tmp_path, case, dtype, max_shard_size):
    build, family = CASES[case]
    config = build()
    state = randomize_(CausalLM(config)).state_dict()
    got = save_pretrained(
        config, state, tmp_path / "got", family=family, dtype=dtype, max_shard_size=max_shard_size
    )
    expected = reference_save(
        config, state, tmp_path / "expected", family=family, dtype=dtype, max_shard_size=max_shard_size
    )
    assert_same_directory(got, expected)
    assert ((got / "model.safetensors.index.json").exists()) == (max_shard_size == "40KB")


class CountingSource(Mapping):
    """A lazy source: each read returns a fresh copy, and the copies still alive are counted."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.tensors, self.alive, self.most_alive, self.reads = tensors, 0, 0, 0

    def meta(self) -> dict[str, torch.Tensor]:
        return {n: torch.empty(t.shape, dtype=t.dtype, device="meta") for n, t in self.tensors.items()}

    def __getitem__(self, name: str) -> torch.Tensor:
        copy = self.tensors[name].clone()
        self.alive, self.reads = self.alive + 1, self.reads + 1
        self.most_alive = max(self.most_alive, self.alive)
        weakref.finalize(copy, self._freed)
        return copy

    def _freed(self) -> None:
        self.alive -= 1

    def __iter__(self) -> Iterator[str]:
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)


def test_a_lazy_source_is_read_once_and_one_layer_at_a_time(tmp_path):
    config = tiny_form("gqa")
    state = randomize_(CausalLM(config)).state_dict()
    source = CountingSource(state)
    save_pretrained(config, source, tmp_path / "out", dtype="bf16")
    per_layer = sum(name.startswith("model.layers.0.") for name in state)
    assert source.reads == len(state)
    assert source.most_alive == per_layer < len(state)  # never more than one layer's tensors held
    assert_same_directory(tmp_path / "out", reference_save(config, state, tmp_path / "ref", dtype="bf16"))


def test_a_tied_head_is_never_read(tmp_path):
    config = tiny_form("gqa", tie_embeddings=True)
    state = randomize_(CausalLM(config)).state_dict()
    source = CountingSource({n: t for n, t in state.items() if n != LM_HEAD})
    save_pretrained(config, source, tmp_path / "out")
    assert source.reads == len(state) - 1 and EMBEDDINGS in state
