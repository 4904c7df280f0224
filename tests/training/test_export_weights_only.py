"""Exporting a distributed (FSDP2/DCP) checkpoint reads the model's weights only - never the optimizer
state - and writes them in bf16 when the run trained in bf16 (``dtype`` overrides), like the export at
the end of fit."""

from __future__ import annotations

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader

from kvforge.arch import CausalLM
from kvforge.conversion import load_pretrained
from kvforge.conversion.loading import CHECKPOINT_KEY, DCP_METADATA
from kvforge.training.export import export_checkpoint, export_dtype
from tests.training.helpers import tiny_config


def _distributed_checkpoint(path, precision):
    """What Lightning's FSDP2 strategy writes: DCP shards of the model and optimizer state + ``meta.pt``."""
    config = tiny_config("gqa")
    torch.manual_seed(0)
    model = CausalLM(config)
    weights = {f"model.{name}": t.detach().clone() for name, t in model.state_dict().items()}
    moments = {f"model.{name}.exp_avg": torch.randn_like(t) for name, t in model.state_dict().items()}
    dcp.save({"state_dict": weights, "optimizer_0": {"state": moments}}, checkpoint_id=path, no_dist=True)
    meta = {CHECKPOINT_KEY: {"format": 1, "model_config": config.to_dict(), "tokenizer_dir": None}}
    meta[CHECKPOINT_KEY]["precision"] = precision
    torch.save(meta, path / DCP_METADATA)
    return {name.removeprefix("model."): t for name, t in weights.items()}


@pytest.fixture
def read_calls(monkeypatch):
    """The checkpoint entries of each read DCP makes."""
    calls: list[list[str]] = []
    original = FileSystemReader.read_data

    def read_data(self, plan, planner):
        calls.append([item.storage_index.fqn for item in plan.items])
        return original(self, plan, planner)

    monkeypatch.setattr(FileSystemReader, "read_data", read_data)
    return calls


def test_export_reads_one_decoder_layer_at_a_time(tmp_path, read_calls):
    weights = _distributed_checkpoint(tmp_path / "last.ckpt", "32-true")
    exported = load_pretrained(export_checkpoint(tmp_path / "last.ckpt", tmp_path / "hf"))
    assert sorted(key for call in read_calls for key in call) == sorted(
        f"state_dict.model.{n}" for n in weights
    )
    for call in read_calls:  # one layer's tensors, or one tensor outside the layers
        assert len({key.split(".")[3] if ".layers." in key else key for key in call}) == 1, call
    assert all(torch.equal(exported.state_dict[name], t) for name, t in weights.items())


def test_bf16_run_exports_bf16_weights_without_reading_the_optimizer_state(tmp_path, read_calls):
    weights = _distributed_checkpoint(tmp_path / "last.ckpt", "bf16-mixed")
    exported = load_pretrained(export_checkpoint(tmp_path / "last.ckpt", tmp_path / "hf"))
    read_keys = [key for call in read_calls for key in call]
    assert read_keys and all(key.startswith("state_dict.") for key in read_keys)
    for name, tensor in weights.items():
        assert exported.state_dict[name].dtype == torch.bfloat16
        torch.testing.assert_close(exported.state_dict[name], tensor.bfloat16(), rtol=0, atol=0)


def test_dtype_overrides_the_run_precision(tmp_path, read_calls):
    weights = _distributed_checkpoint(tmp_path / "last.ckpt", "bf16-mixed")
    exported = load_pretrained(export_checkpoint(tmp_path / "last.ckpt", tmp_path / "hf", dtype="fp32"))
    for name, tensor in weights.items():
        torch.testing.assert_close(exported.state_dict[name], tensor, rtol=0, atol=0)


@pytest.mark.parametrize(
    "precision, dtype",
    [("bf16-mixed", "bf16"), ("bf16-true", "bf16"), ("16-mixed", "fp16"), ("32-true", None)],
)
def test_export_dtype_follows_the_compute_precision(precision, dtype):
    assert export_dtype(precision) == dtype
