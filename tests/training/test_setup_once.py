"""A run's one-time conversion (rank 0) streams through convert_checkpoint and agrees with the in-memory path."""

from __future__ import annotations

import torch

from kvforge.conversion import load_pretrained
from kvforge.training.model_source import apply_transform, changed_parameters
from kvforge.training.setup_once import convert_to_directory
from tests.conftest import shared_path


def test_streamed_run_conversion_equals_the_in_memory_transform(tmp_path):
    source_dir = str(shared_path("stories260K"))
    step = {"to": "gqa", "n_kv_heads": 2}
    changed = convert_to_directory(source_dir, step, None, tmp_path / "converted")

    source = load_pretrained(source_dir)
    config, state_dict = apply_transform(source.config, source.state_dict, step, None)
    converted = load_pretrained(tmp_path / "converted")
    assert converted.config.layers == config.layers
    assert converted.state_dict.keys() == state_dict.keys()
    for name, tensor in state_dict.items():
        torch.testing.assert_close(converted.state_dict[name], tensor, rtol=0, atol=1e-5, msg=name)
    assert changed == changed_parameters(source.config, source.state_dict, config, state_dict)
    assert changed and all(".self_attn." in name for name in changed)
