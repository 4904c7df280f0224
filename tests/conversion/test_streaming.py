"""convert_checkpoint: one layer at a time from the safetensors on disk, equal to the in-memory transforms."""

from __future__ import annotations

import json

import pytest
import torch

from kvforge.conversion import checkpoint as checkpoint_module
from kvforge.conversion import load_pretrained
from kvforge.conversion.convert import convert_checkpoint
from kvforge.conversion.transforms import TRANSFORMS
from tests.conftest import shared_path
from tests.conversion.stories_data import calibration_ids, stories

TOLERANCE = 1e-5  # the bar; on CPU the two paths run the same fp32/fp64 math and agree exactly

CASES = {
    "gqa-aligned": ("gqa", {"n_kv_heads": 2}),
    "gqa-mean": ("gqa", {"n_kv_heads": 2, "method": "mean"}),
    "mqa-refined": ("mqa", {"refine_steps": 3}),
    "mla-deepseek": ("mla", {"kv_lora_rank": 24, "rope_dims": 8}),
    "mla-kvforge": ("mla", {"kv_lora_rank": 24, "rope_dims": 8, "layout": "kvforge"}),
    "cla-fit": ("cla", {"factor": 2}),
    "cla-first": ("cla", {"factor": 2, "init": "first"}),
    "window": ("window", {"windows": 64}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_streamed_conversion_equals_the_in_memory_transform(case, tmp_path):
    name, options = CASES[case]
    source, ids = stories("stories260K"), calibration_ids(2, 128)
    torch.manual_seed(0)
    config, expected = TRANSFORMS[name](source.config, source.state_dict, ids, **options)
    torch.manual_seed(0)
    out, _, streamed_config = convert_checkpoint(
        shared_path("stories260K"), tmp_path / case, name, options, device="cpu", calibration=ids
    )
    assert streamed_config == config
    converted = load_pretrained(out)
    assert converted.config.layers == config.layers
    assert set(converted.state_dict) == set(expected)
    for key, tensor in expected.items():
        got = converted.state_dict[key]
        assert got.dtype == tensor.dtype, key
        assert (got.double() - tensor.double()).abs().max().item() <= TOLERANCE, key


def test_streamed_output_is_one_shard_per_layer_with_an_index(tmp_path):
    source = stories("stories260K")
    out, _, _ = convert_checkpoint(
        shared_path("stories260K"), tmp_path / "gqa", "gqa", {"n_kv_heads": 2}, device="cpu", calibration=None
    )
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    n = source.config.n_layers + 1  # embeddings/norm/head + one per layer
    assert shards == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert not list(tmp_path.glob(".gqa.tmp-*"))


def test_conversion_reads_each_source_tensor_one_layer_at_a_time(tmp_path, monkeypatch):
    """The working set is a layer: between two reads of layer i's tensors no other layer is read, and the
    calibrated transform never asks for the whole model at once."""
    reads: list[str] = []
    original = checkpoint_module.read_entry

    def spy(entry, name, **options):
        reads.append(name)
        return original(entry, name, **options)

    monkeypatch.setattr(checkpoint_module, "read_entry", spy)
    convert_checkpoint(
        shared_path("stories260K"),
        tmp_path / "gqa",
        "gqa",
        {"n_kv_heads": 2},
        device="cpu",
        calibration=calibration_ids(2, 64),
    )
    layers = [int(name.split(".")[2]) for name in reads if name.startswith("model.layers.")]
    assert layers == sorted(layers), "layers must be read in order, each finished before the next"


def test_self_calibration_is_the_default(tmp_path, monkeypatch):
    from kvforge.conversion.transforms import calibration

    calls = []
    original = calibration.sample_calibration_ids

    def spy(*args, **kwargs):
        calls.append(args[2:4])
        return original(*args, **kwargs)

    monkeypatch.setattr(calibration, "sample_calibration_ids", spy)
    monkeypatch.setattr("kvforge.conversion.transforms.sample_calibration_ids", spy)
    convert_checkpoint(
        shared_path("stories260K"),
        tmp_path / "mqa",
        "mqa",
        {},
        device="cpu",
        calib_tokens=256,
        calib_seq_len=128,
    )
    assert calls == [(256, 128)]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("case", ["gqa-aligned", "mla-deepseek", "cla-fit"])
def test_conversion_on_cuda_matches_the_cpu_conversion(case, tmp_path):
    """The math runs on the GPU; fp32/fp64 kernels differ from the CPU's only by round-off."""
    name, options = CASES[case]
    ids = calibration_ids(2, 128)
    outs = {
        device: convert_checkpoint(
            shared_path("stories260K"), tmp_path / device, name, options, device=device, calibration=ids
        )[0]
        for device in ("cpu", "cuda")
    }
    cpu, cuda = (load_pretrained(outs[d]).state_dict for d in ("cpu", "cuda"))
    for key, tensor in cpu.items():
        scale = tensor.abs().max().item() + 1e-6
        assert (cuda[key] - tensor).abs().max().item() <= 1e-4 * scale, key


def test_sampling_with_streamed_layers_writes_the_same_text():
    """Layers read at every step instead of held give the same samples (memory is all they change)."""
    from kvforge.conversion.transforms import sample_calibration_ids

    source = stories("stories260K")
    held = sample_calibration_ids(source.config, source.state_dict, 256, 64, 0)
    streamed = sample_calibration_ids(source.config, source.state_dict, 256, 64, 0, streamed=range(2, 5))
    assert torch.equal(held, streamed)
