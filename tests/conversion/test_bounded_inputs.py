"""Hostile or broken inputs to `kvforge convert` and `kvforge inspect`: refused from the headers, before
anything is allocated, with an error that names the file, the tensor or the config key."""

from __future__ import annotations

import json
import shutil
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from kvforge.cli.main import main
from kvforge.conversion import checkpoint
from kvforge.conversion.checkpoint import read_header
from kvforge.conversion.convert import convert_checkpoint
from kvforge.conversion.loading import open_checkpoint
from tests.conftest import shared_path

STORIES = shared_path("stories260K")
GQA = ("gqa", {"n_kv_heads": 2, "method": "mean"})


@pytest.fixture
def stories_copy(tmp_path):
    return shutil.copytree(STORIES, tmp_path / "model")


def _rewrite_header(path, change) -> None:
    """Replace a safetensors file's JSON header by ``change(header)`` (the data stays as it is)."""
    data = path.read_bytes()
    length = struct.unpack("<Q", data[:8])[0]
    header = change(json.loads(data[8 : 8 + length]))
    encoded = json.dumps(header).encode()
    encoded += b" " * (length - len(encoded)) if len(encoded) <= length else b""
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data[8 + length :])


def _claim(name, **fields):
    def change(header):
        header[name].update(fields)
        return header

    return change


EMBED = "model.embed_tokens.weight"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (_claim(EMBED, shape=[10**6, 10**6]), "hold .* bytes; .* needs"),
        (_claim(EMBED, data_offsets=[0, 10**12]), "hold .* bytes|ends at byte"),
        (_claim(EMBED, dtype="F8_E4M3X"), "dtype 'F8_E4M3X' is not supported"),
        (lambda header: {**header, EMBED: "not an entry"}, "needs dtype, shape and data_offsets"),
    ],
    ids=["huge shape", "offsets past the end", "unknown dtype", "malformed entry"],
)
def test_hostile_header_is_refused_before_any_allocation(stories_copy, tmp_path, change, message):
    _rewrite_header(stories_copy / "model.safetensors", change)
    with pytest.raises(ValueError, match=message):
        read_header(stories_copy / "model.safetensors")
    with pytest.raises(ValueError, match=message):
        convert_checkpoint(stories_copy, tmp_path / "out", *GQA, device="cpu", calibration=None)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("key", "value"), [("vocab_size", 10**12), ("num_hidden_layers", 10**9), ("hidden_size", 2**40)]
)
def test_config_sizes_that_disagree_with_the_weights_are_refused_by_convert_and_inspect(
    stories_copy, tmp_path, capsys, key, value
):
    config = json.loads((stories_copy / "config.json").read_text())
    (stories_copy / "config.json").write_text(json.dumps({**config, key: value}))
    with pytest.raises(ValueError, match=f"config.json has {key}={value} but the weights hold"):
        convert_checkpoint(stories_copy, tmp_path / "out", *GQA, device="cpu", calibration=None)
    assert main(["inspect", str(stories_copy)]) == 2
    assert f"{key}={value} but the weights hold" in capsys.readouterr().err


def test_non_finite_weight_is_a_clear_error_naming_the_tensor(stories_copy, tmp_path):
    tensors = load_file(stories_copy / "model.safetensors")
    name = "model.layers.2.self_attn.k_proj.weight"
    tensors[name][3, 1] = float("nan")
    save_file(tensors, stories_copy / "model.safetensors", {"format": "pt"})
    with pytest.raises(ValueError, match=rf"tensor '{name}' holds 1 non-finite values"):
        convert_checkpoint(
            stories_copy, tmp_path / "out", "gqa", {"n_kv_heads": 2}, device="cpu", calibration=None
        )
    assert not (tmp_path / "out").exists()


def test_a_tensor_is_scanned_for_non_finite_values_on_its_first_read_only(stories_copy, monkeypatch):
    scans = []

    def spy(entry, name, check_finite=True, into=None):
        scans.append(check_finite)
        return read_entry(entry, name, check_finite, into)

    read_entry = checkpoint.read_entry
    monkeypatch.setattr(checkpoint, "read_entry", spy)
    weights = open_checkpoint(stories_copy)
    name = "model.layers.0.mlp.up_proj.weight"
    torch.testing.assert_close(weights[name], weights[name], rtol=0, atol=0)
    assert scans == [True, False]


def test_a_non_finite_tensor_is_refused_at_every_read(stories_copy):
    tensors = load_file(stories_copy / "model.safetensors")
    name = "model.layers.1.mlp.down_proj.weight"
    tensors[name][0, 0] = float("inf")
    save_file(tensors, stories_copy / "model.safetensors", {"format": "pt"})
    weights = open_checkpoint(stories_copy)
    for _ in range(2):  # a refused tensor is never marked as scanned
        with pytest.raises(ValueError, match=rf"tensor '{name}' holds 1 non-finite values"):
            weights[name]


def test_inspect_says_the_weights_match_the_config(capsys):
    assert main(["inspect", str(STORIES), "--json"]) == 0
    weights = json.loads(capsys.readouterr().out)["weights"]
    assert weights["status"] == "match" and weights["files"] == 1 and weights["tensors"] > 0


def _truncate(model):
    data = (model / "model.safetensors").read_bytes()
    (model / "model.safetensors").write_bytes(data[: len(data) // 2])


def _drop_tensor(model):
    tensors = load_file(model / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, model / "model.safetensors", {"format": "pt"})


def _index_outside(model):
    tensors = load_file(model / "model.safetensors")
    index = {"weight_map": dict.fromkeys(tensors, "../elsewhere.safetensors")}
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    (model / "model.safetensors").unlink()


def _missing(model):
    (model / "model.safetensors").unlink()
    (model / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {EMBED: "gone.safetensors"}})
    )


def _wrong_shape(model):
    tensors = load_file(model / "model.safetensors")
    tensors["model.layers.1.mlp.up_proj.weight"] = torch.zeros(3, 3)
    save_file(tensors, model / "model.safetensors", {"format": "pt"})


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (_truncate, "INVALID.*truncated"),
        (_drop_tensor, "MISMATCH.*missing tensors: model.layers.1.mlp.up_proj.weight"),
        (_wrong_shape, "MISMATCH.*wrong shapes: model.layers.1.mlp.up_proj.weight"),
        (_index_outside, "INVALID.*points outside the model directory"),
        (_missing, "INVALID.*does not exist"),
    ],
    ids=["truncated", "missing tensor", "wrong shape", "index leaves the directory", "missing shard"],
)
def test_inspect_reports_broken_weights_and_exits_1(stories_copy, capsys, damage, message):
    damage(stories_copy)
    assert main(["inspect", str(stories_copy)]) == 1
    assert __import__("re").search(message, " ".join(capsys.readouterr().out.split()))
