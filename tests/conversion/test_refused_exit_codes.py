"""Broken inputs end in a clear error and a non-zero exit (issue 31's held-out cases): sizes no model
has, a config.json that is no JSON object, and a directory `inspect` cannot vouch for - unless
`--config-only` asks for a plan from the config alone."""

from __future__ import annotations

import json
import resource
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from kvforge.cli.main import main
from tests.conftest import shared_path

STORIES = shared_path("stories260K")
MEMORY_CAP = 4 * 2**30  # address space a refusal may add: nothing near what 10^9 layers would allocate


@pytest.fixture
def memory_cap():
    """Cap the process's address space for the test: a regression that allocates per declared layer
    fails with a MemoryError here instead of taking the machine's memory."""
    with open("/proc/self/status") as status:
        in_use = int(next(line for line in status if line.startswith("VmSize")).split()[1]) * 1024
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (in_use + MEMORY_CAP, hard))
    yield
    resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


@pytest.fixture
def model(tmp_path):
    return shutil.copytree(STORIES, tmp_path / "model")


def _set_config(model, **changes) -> None:
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, **changes}))


@pytest.mark.parametrize(
    ("key", "value"), [("num_hidden_layers", 10**9), ("vocab_size", 10**12), ("hidden_size", 2**40)]
)
@pytest.mark.parametrize("command", [["convert", "--to", "mqa"], ["inspect", "--config-only"]])
def test_sizes_no_model_has_are_refused_from_the_config_alone(
    model, tmp_path, capsys, memory_cap, key, value, command
):
    """Before any weight is read, and before anything per layer is allocated."""
    _set_config(model, **{key: value})
    out = [str(tmp_path / "out")] if command[0] == "convert" else []
    assert main([command[0], str(model), *out, *command[1:]]) == 2
    err = capsys.readouterr().err
    assert f"{key}={value}" in err and err.count("\n") == 1  # one line, no traceback


@pytest.mark.parametrize(
    "command", [["inspect"], ["inspect", "--config-only"], ["convert", "OUT", "--to", "mqa"]]
)
def test_a_config_json_that_is_a_list_is_a_clear_error(model, tmp_path, capsys, command):
    (model / "config.json").write_text("[1, 2, 3]")
    argv = [str(tmp_path / "out") if arg == "OUT" else arg for arg in command[1:]]
    assert main([command[0], str(model), *argv]) == 2
    assert "expected a JSON object, got list" in capsys.readouterr().err


def _nan(model):
    tensors = load_file(model / "model.safetensors")
    tensors["model.layers.3.mlp.up_proj.weight"][2, 5] = float("nan")
    save_file(tensors, model / "model.safetensors", {"format": "pt"})


def _only_pickle(model):
    torch.save(load_file(model / "model.safetensors"), model / "pytorch_model.bin")
    (model / "model.safetensors").unlink()


def _no_weights(model):
    (model / "model.safetensors").unlink()


@pytest.mark.parametrize(
    ("damage", "words"),
    [
        (_nan, "tensor 'model.layers.3.mlp.up_proj.weight' holds 1 non-finite"),
        (_only_pickle, "UNCHECKED: pickle weights"),
        (_no_weights, "NONE: no weight files (pass --config-only"),
    ],
    ids=["nan", "only pickle", "no weights"],
)
def test_inspect_exits_1_on_weights_it_cannot_vouch_for_and_0_with_config_only(model, capsys, damage, words):
    damage(model)
    assert main(["inspect", str(model)]) == 1
    printed = " ".join(capsys.readouterr().out.split())
    assert "KV cache" in printed and words in printed  # the whole report, then the verdict
    assert main(["inspect", str(model), "--config-only", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["weights"]["status"] == "skipped"


def test_inspect_of_a_sound_checkpoint_reads_every_value_and_exits_0(capsys):
    assert main(["inspect", str(STORIES)]) == 0
    assert "every value finite" in " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize(
    "step", [{"to": "mla", "kv_lora_rank": 0}, {"to": "mla", "kv_lora_rank": 0, "rope_dims": 0}]
)
def test_a_yaml_convert_step_names_a_count_below_one_before_a_missing_option(step):
    """train's model.convert reads the options as `kvforge convert` does: the bad rank, not 'needs rope_dims'."""
    from kvforge.training.model_source import transform_and_options

    with pytest.raises(ValueError, match=r"kv_lora_rank=0: must be a positive integer"):
        transform_and_options(step)
