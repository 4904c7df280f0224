"""`kvforge convert` decides everything the config can tell before any work: a no-op says "nothing to
change" without calibrating, and a refusal names the real cause with nothing printed before it.

The source is a random Gemma 3-shaped model with Gemma 3's 262,144-token vocabulary: MQA, 5 sliding
(window 16) : 1 global layers, q/k norms, a separate RoPE base for the sliding layers."""

from __future__ import annotations

import pytest
import torch
import transformers
from safetensors.torch import load_file

import kvforge.conversion.transforms as transforms
from kvforge.cli.main import main

VOCAB = 262_144
NOOP_EXIT = 3


@pytest.fixture(scope="module")
def gemma3(tmp_path_factory):
    config = transformers.Gemma3TextConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=16,
        sliding_window=16,
        query_pre_attn_scalar=16,
        max_position_embeddings=128,
        layer_types=["sliding_attention"] * 5 + ["full_attention"],
    )
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("gemma3") / "src"
    transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(path)
    return path


@pytest.fixture
def no_calibration(monkeypatch):
    """Calibration text is never sampled nor read."""

    def refuse(*args, **kwargs):
        raise AssertionError("calibration ran")

    monkeypatch.setattr(transforms, "sample_calibration_ids", refuse)
    monkeypatch.setattr(transforms, "load_calibration_ids", refuse)


@pytest.mark.parametrize("options", [["--to", "mqa"], ["--to", "gqa", "--n-kv-heads", "1"]])
def test_noop_conversion_writes_an_unchanged_copy_without_calibrating(
    gemma3, tmp_path, capsys, no_calibration, options
):
    out = tmp_path / "out"
    assert main(["convert", str(gemma3), str(out), *options]) == 0
    printed = " ".join(capsys.readouterr().out.split())
    assert printed.startswith("nothing to change:") and "Calibration" not in printed
    source, copy = load_file(gemma3 / "model.safetensors"), load_file(out / "model.safetensors")
    assert source.keys() == copy.keys()
    assert all(torch.equal(source[name], copy[name]) for name in source)


def test_noop_with_fail_if_noop_exits_3_and_writes_nothing(gemma3, tmp_path, capsys, no_calibration):
    out = tmp_path / "out"
    assert main(["convert", str(gemma3), str(out), "--to", "mqa", "--fail-if-noop"]) == NOOP_EXIT
    captured = capsys.readouterr()
    assert captured.out == "" and "nothing to change" in captured.err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("options", "first_cause", "not_this"),
    [
        # no init pairs a sliding layer with a global one: the windows, not "use --init first"
        (["--to", "cla", "--factor", "2"], "layers [4, 5] have different window [16, None]", "init="),
        # the source cannot become MLA at all: said before the missing --rope-dims or the bad rank
        (["--to", "mla", "--kv-lora-rank", "16"], "window_rope_theta", "--rope-dims"),
        (["--to", "mla", "--kv-lora-rank", "0"], "window_rope_theta", "--rope-dims"),
        # a global layer would turn sliding, which changes its RoPE base
        (["--to", "window", "--windows", "8"], "layer 5 would change from global to sliding", "Calibration"),
    ],
)
def test_refusal_names_the_real_cause_first_with_nothing_printed_before(
    gemma3, tmp_path, capsys, no_calibration, options, first_cause, not_this
):
    assert main(["convert", str(gemma3), str(tmp_path / "out"), *options]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""  # no start-up line
    assert first_cause in captured.err and not_this not in captured.err
    assert list(tmp_path.iterdir()) == []


def test_zero_latent_rank_is_named_not_a_missing_rope_dims(tmp_path, capsys):
    from tests.conftest import shared_path

    stories = shared_path("stories260K")
    assert main(["convert", str(stories), str(tmp_path / "out"), "--to", "mla", "--kv-lora-rank", "0"]) == 2
    err = capsys.readouterr().err
    assert "--kv-lora-rank 0" in err and "rope" not in err
