"""A run's conversion streams through convert_checkpoint - one step, a chain (one directory per step),
rank 0's and a one-process run's alike - and agrees with the in-memory path."""

from __future__ import annotations

import pytest
import torch

from kvforge.conversion import convert as convert_module
from kvforge.conversion import load_pretrained
from kvforge.training.model_source import (
    CalibrationConfig,
    calibration_tokens,
    changed_parameters,
    resolve_starting_point,
    transform_and_options,
)
from kvforge.training.setup_once import convert_to_directory
from tests.conftest import shared_path

CONVERTS = {
    "gqa": {"to": "gqa", "n_kv_heads": 2},
    "gqa-then-gta": [{"to": "gqa", "n_kv_heads": 2, "method": "mean"}, {"to": "gta"}],
    "gqa-then-cla-then-window": [
        {"to": "gqa", "n_kv_heads": 2},
        {"to": "cla", "factor": 2, "init": "first"},
        {"to": "window", "windows": 32},
    ],
}
CALIBRATED = {
    "mla-then-gla": [{"to": "mla", "kv_lora_rank": 24, "rope_dims": 8}, {"to": "gla", "n_latent_heads": 2}]
}


def in_memory(source_dir: str, convert, tokens: torch.Tensor | None):
    """The reference: every step applied to the whole state dict in memory."""
    source = load_pretrained(source_dir)
    config, state_dict = source.config, source.state_dict
    for step in [convert] if isinstance(convert, dict) else convert:
        record, options = transform_and_options(step)
        config, state_dict = record(config, state_dict, tokens, **record.kwargs(options))
    return config, state_dict, changed_parameters(source.config, source.state_dict, config, state_dict)


def assert_same_model(got, config, state_dict) -> None:
    assert got.config.layers == config.layers
    assert got.state_dict.keys() == state_dict.keys()
    for name, tensor in state_dict.items():
        torch.testing.assert_close(got.state_dict[name], tensor, rtol=0, atol=1e-5, msg=name)


@pytest.fixture(scope="module")
def calibration(tmp_path_factory) -> CalibrationConfig:
    text = shared_path("corpora", "tinystories_val_prefix.txt").read_text(encoding="utf-8")[:20_000]
    path = tmp_path_factory.mktemp("calibration") / "calibration.txt"
    path.write_text(text, encoding="utf-8")
    return CalibrationConfig(files=[str(path)], n_sequences=2, seq_len=64)


@pytest.mark.parametrize("case", [*CONVERTS, *CALIBRATED])
def test_run_conversion_equals_the_in_memory_transforms(case, tmp_path, calibration, monkeypatch):
    source_dir = str(shared_path("stories260K"))
    convert = CONVERTS.get(case) or CALIBRATED[case]
    calib = calibration if case in CALIBRATED else None
    streamed = []
    original = convert_module.convert_checkpoint

    def spy(src, out, transform, *args, **kwargs):
        streamed.append(transform)
        return original(src, out, transform, *args, **kwargs)

    monkeypatch.setattr(convert_module, "convert_checkpoint", spy)
    changed = convert_to_directory(source_dir, convert, calib, tmp_path / "converted")
    assert streamed == [step["to"] for step in ([convert] if isinstance(convert, dict) else convert)]

    tokens = calibration_tokens(calib, source_dir) if calib else None
    config, state_dict, expected_changed = in_memory(source_dir, convert, tokens)
    assert_same_model(load_pretrained(tmp_path / "converted"), config, state_dict)
    assert changed == expected_changed
    assert changed and all(".self_attn." in name for name in changed)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["converted"], "intermediate directories are removed"


def test_a_failing_step_of_a_chain_leaves_nothing_behind(tmp_path):
    """The second step refuses the first one's output (gta needs gqa layers): no output, no intermediates."""
    convert = [{"to": "mla", "kv_lora_rank": 24, "rope_dims": 8}, {"to": "gta"}]
    with pytest.raises(ValueError, match=r"to_gta: layer 0 is 'mla'"):
        convert_to_directory(str(shared_path("stories260K")), convert, None, tmp_path / "converted")
    assert list(tmp_path.iterdir()) == []


def test_one_process_run_converts_through_a_temporary_directory_it_removes(tmp_path):
    source_dir = str(shared_path("stories260K"))
    convert = CONVERTS["gqa-then-gta"]
    start = resolve_starting_point(None, source_dir, convert, None, None, True, work_dir=tmp_path / "run")

    config, state_dict, changed = in_memory(source_dir, convert, None)
    assert start.config == config and start.changed == changed
    assert start.state_dict.keys() == state_dict.keys()
    for name, tensor in state_dict.items():
        torch.testing.assert_close(start.state_dict[name], tensor, rtol=0, atol=1e-5, msg=name)
    assert start.teacher.config == load_pretrained(source_dir).config  # the unconverted source
    assert list((tmp_path / "run").iterdir()) == []
