"""Truncated or corrupted weight files and out-of-range conversion options: a ValueError naming the
file or option, and no output directory written."""

from __future__ import annotations

import shutil

import pytest

from kvforge.arch import CausalLM
from kvforge.cli.main import main
from kvforge.conversion import load_pretrained
from kvforge.conversion.transforms import TRANSFORMS
from tests.conftest import shared_path, tiny_form

STORIES = shared_path("stories260K")


@pytest.fixture
def stories_copy(tmp_path):
    return shutil.copytree(STORIES, tmp_path / "model")


def _corrupt(data: bytes, how: str) -> bytes:
    return {
        "truncated": data[: len(data) // 2],
        "empty": b"",
        "garbage header": b"\x20\x00\x00\x00\x00\x00\x00\x00" + b"not json" * 4 + data[40:],
        "header length beyond the file": (10**12).to_bytes(8, "little") + data[8:],
    }[how]


@pytest.mark.parametrize("how", ["truncated", "empty", "garbage header", "header length beyond the file"])
def test_corrupted_safetensors_is_a_value_error_naming_the_file(stories_copy, how):
    weights = stories_copy / "model.safetensors"
    weights.write_bytes(_corrupt(weights.read_bytes(), how))
    with pytest.raises(ValueError, match=r"model\.safetensors: not a valid safetensors file"):
        load_pretrained(stories_copy)


def test_export_of_a_truncated_model_writes_nothing(stories_copy, tmp_path, capsys):
    weights = stories_copy / "model.safetensors"
    weights.write_bytes(_corrupt(weights.read_bytes(), "truncated"))
    assert main(["export", str(stories_copy), str(tmp_path / "out")]) == 2
    # export reads the headers first (it streams tensor by tensor): the tensor cut off is named
    assert "truncated download?" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_truncated_pickle_weights_are_a_value_error_even_when_allowed(stories_copy):
    import torch

    state = load_pretrained(STORIES).state_dict
    (stories_copy / "model.safetensors").unlink()
    torch.save(state, stories_copy / "pytorch_model.bin")
    data = (stories_copy / "pytorch_model.bin").read_bytes()
    (stories_copy / "pytorch_model.bin").write_bytes(data[: len(data) // 2])
    with pytest.raises(
        ValueError, match=r"pytorch_model\.bin: cannot be read with torch\.load\(weights_only=True\)"
    ):
        load_pretrained(stories_copy, allow_pickle=True)


@pytest.fixture(scope="module")
def source():
    config = tiny_form("gqa")
    return config, CausalLM(config).state_dict()


@pytest.mark.parametrize(
    ("name", "options", "match"),
    [
        ("gqa", {"n_kv_heads": 0}, r"n_kv_heads=0 must divide"),
        ("gqa", {"n_kv_heads": "2"}, r"n_kv_heads='2' must divide"),
        ("gqa", {"n_kv_heads": True}, r"n_kv_heads=True must divide"),
        ("cla", {"factor": 99}, r"factor=99 must be in 2\.\.n_layers"),
        ("cla", {"factor": 2.0}, r"factor=2\.0 must be in"),
        ("window", {"windows": 0}, r"window=0 must be an integer in 1\.\."),
        ("window", {"windows": [-8, None]}, r"window=-8 must be an integer"),
        ("window", {"windows": 10_000}, r"window=10000 .*is global attention: write None"),
        ("window", {"windows": 2.5}, r"window=2\.5 must be an integer"),
    ],
)
def test_conversion_option_out_of_range_is_a_clear_error(source, name, options, match):
    with pytest.raises(ValueError, match=match):
        TRANSFORMS[name](*source, **options)
