"""convert_checkpoint: one layer at a time from the safetensors on disk, equal to the in-memory transforms."""

from __future__ import annotations

import gc
import weakref

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
    "window-sinks": ("window", {"windows": 32, "sinks": True}),
    "chunked": ("chunked", {"chunk": 32, "global_every": 2}),
    "gta": ("gta", {}),
    "gla-from-gqa": ("gla", {"n_latent_heads": 2, "kv_lora_rank": 24, "rope_dims": 8}),
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


def test_streamed_output_is_sharded_by_size_as_export_writes_it(tmp_path):
    """Written one layer at a time, packed by export's one rule: under 5GB, a single model.safetensors."""
    out, _, _ = convert_checkpoint(
        shared_path("stories260K"), tmp_path / "gqa", "gqa", {"n_kv_heads": 2}, device="cpu", calibration=None
    )
    assert sorted(path.name for path in out.glob("*.safetensors*")) == ["model.safetensors"]
    assert not list(tmp_path.glob(".gqa.tmp-*"))


def _assert_equal_state_dicts(got: dict, expected: dict) -> None:
    assert set(got) == set(expected)
    for key, tensor in expected.items():
        assert got[key].dtype == tensor.dtype, key
        assert (got[key].double() - tensor.double()).abs().max().item() <= TOLERANCE, key


def test_gla_streams_from_an_mla_directory(tmp_path):
    """to_gla on an MLA source splits each layer's latent as it is read (no to_mla step)."""
    ids = calibration_ids(2, 128)
    mla_dir, _, _ = convert_checkpoint(
        shared_path("stories260K"),
        tmp_path / "mla",
        "mla",
        {"kv_lora_rank": 24, "rope_dims": 8},
        calibration=ids,
    )
    mla = load_pretrained(mla_dir)
    config, expected = TRANSFORMS["gla"](mla.config, mla.state_dict, ids, n_latent_heads=2)
    out, _, streamed_config = convert_checkpoint(
        mla_dir, tmp_path / "gla", "gla", {"n_latent_heads": 2}, device="cpu", calibration=ids
    )
    assert streamed_config == config
    _assert_equal_state_dicts(load_pretrained(out).state_dict, expected)


STREAMED = ["gqa-aligned", "mla-deepseek", "window-sinks", "chunked", "gta", "gla-from-gqa"]


@pytest.mark.parametrize("case", STREAMED)
def test_conversion_holds_at_most_two_layers_of_source_tensors(case, tmp_path, monkeypatch):
    """The working set is a layer: whenever a layer's tensor is read, the source tensors still alive
    belong to at most two layers (the one being converted and the one just written), never the whole
    model, and layers are read in order (a calibrated transform may make more than one pass)."""
    alive: list[tuple[int, weakref.ref]] = []
    reads: list[int] = []
    most = 0
    original = checkpoint_module.CheckpointWeights.__getitem__

    def spy(self, name):
        nonlocal most
        tensor = original(self, name)
        if name.startswith("model.layers."):
            layer = int(name.split(".")[2])
            reads.append(layer)
            gc.collect()
            alive[:] = [(index, ref) for index, ref in alive if ref() is not None]
            alive.append((layer, weakref.ref(tensor)))
            most = max(most, len({index for index, _ in alive}))
        return tensor

    monkeypatch.setattr(checkpoint_module.CheckpointWeights, "__getitem__", spy)
    name, options = CASES[case]
    convert_checkpoint(
        shared_path("stories260K"),
        tmp_path / case,
        name,
        options,
        device="cpu",
        calibration=calibration_ids(2, 64),
    )
    n_layers = stories("stories260K").config.n_layers
    assert most <= 2, f"source tensors of {most} layers were held at once"
    passes = [i for i in range(1, len(reads)) if reads[i] < reads[i - 1]]
    for start, end in zip([0, *passes], [*passes, len(reads)]):
        assert reads[start:end] == sorted(reads[start:end]), "layers must be read in order within a pass"
    assert set(reads) == set(range(n_layers))


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
@pytest.mark.parametrize("case", ["gqa-aligned", "mla-deepseek", "cla-fit", "gta"])
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


def test_sampling_keeps_its_cache_under_the_budget(monkeypatch):
    """Rows whose caches would exceed ``max_cache_bytes`` together are sampled in batches that fit it;
    with room for all rows there is one batch, and the rows come back in order, each from BOS."""
    from kvforge.arch import kv_cache_bytes
    from kvforge.conversion.transforms import calibration, sample_calibration_ids

    source = stories("stories260K")
    per_row = kv_cache_bytes(source.config, 64 + 1, torch.float32)
    batches = []
    generate = calibration.generate

    def recording(model, start, *args, **kwargs):
        batches.append(len(start))
        return generate(model, start, *args, **kwargs)

    monkeypatch.setattr(calibration, "generate", recording)
    ids = sample_calibration_ids(source.config, source.state_dict, 7 * 64, 64, 0, max_cache_bytes=3 * per_row)
    assert batches == [3, 3, 1] and ids.shape == (7, 64)
    batches.clear()
    whole = sample_calibration_ids(
        source.config, source.state_dict, 7 * 64, 64, 0, max_cache_bytes=7 * per_row
    )
    assert batches == [7] and whole.shape == (7, 64)
    assert torch.equal(whole, sample_calibration_ids(source.config, source.state_dict, 7 * 64, 64, 0))


def test_sampling_streamed_from_disk_reads_into_one_reused_slab(monkeypatch):
    """Layers streamed from the safetensors are read into one reused buffer (no new allocation per
    tensor and step) and write the same text as the held model."""
    from kvforge.conversion.loading import open_checkpoint
    from kvforge.conversion.transforms import calibration, sample_calibration_ids

    weights = open_checkpoint(shared_path("stories260K"))
    held = sample_calibration_ids(weights.config, dict(weights), 256, 64, 0)
    slabs, pointers, reads = [], set(), []
    read = calibration.LayerSlab.read

    def recording(self, source, names):
        slabs.append(self)
        tensors = read(self, source, names)
        pointers.add(self.bytes.data_ptr())
        reads.append(all(t.untyped_storage().data_ptr() == self.bytes.data_ptr() for t in tensors.values()))
        return tensors

    monkeypatch.setattr(calibration.LayerSlab, "read", recording)
    streamed = sample_calibration_ids(weights.config, weights, 256, 64, 0, streamed=range(2, 5))
    assert torch.equal(held, streamed)
    assert len(slabs) == 3 * 64 and len(set(map(id, slabs))) == 1  # 3 layers x 64 steps, one slab
    assert len(pointers) == 1 and all(reads)  # never reallocated; every tensor a view of it


def test_read_entry_into_a_buffer_refuses_a_small_one():
    from kvforge.conversion.checkpoint import checkpoint_entries, read_entry

    entries = checkpoint_entries(shared_path("stories260K"))
    name, entry = next((n, e) for n, e in entries.items() if e.dtype.is_floating_point and e.nbytes > 64)
    fresh = read_entry(entry, name)
    buffer = torch.zeros(entry.nbytes + 128, dtype=torch.uint8)
    assert torch.equal(read_entry(entry, name, into=buffer[64:]), fresh)
    with pytest.raises(ValueError, match=f"at least {entry.nbytes} bytes"):
        read_entry(entry, name, into=torch.empty(entry.nbytes - 1, dtype=torch.uint8))
