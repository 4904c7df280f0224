"""`kvforge convert` as a user runs it: a real conversion, and bad input refused before writing."""

from __future__ import annotations

import json

import pytest
import torch

from kvforge.cli.main import main
from kvforge.conversion import load_pretrained
from tests.conftest import shared_path

STORIES = str(shared_path("stories260K"))
BOTCHAN = str(shared_path("corpora", "botchan.txt"))


def test_convert_to_gqa_with_calibration_writes_a_stock_llama(tmp_path, capsys):
    out = tmp_path / "gqa2"
    args = ["convert", STORIES, str(out), "--to", "gqa", "--n-kv-heads", "2"]
    assert main([*args, "--calib", BOTCHAN, "--calib-tokens", "512", "--calib-seq-len", "128"]) == 0
    printed = capsys.readouterr().out
    assert "LlamaForCausalLM" in printed and "x0.500" in printed
    assert json.loads((out / "config.json").read_text())["num_key_value_heads"] == 2
    assert load_pretrained(out).config.n_kv_heads == 2
    assert (out / "tokenizer.json").is_file() or (out / "tokenizer.model").is_file()


def test_convert_to_mla_self_calibrates_by_default_and_writes_a_stock_deepseek_v3(tmp_path, capsys):
    out = tmp_path / "mla"
    args = ["convert", STORIES, str(out), "--to", "mla", "--kv-lora-rank", "28", "--rope-dims", "4"]
    assert main([*args, "--calib-tokens", "128", "--calib-seq-len", "64"]) == 0
    printed = capsys.readouterr().out
    assert "128 tokens sampled from" in printed and "DeepseekV3ForCausalLM" in printed
    assert "Refinement: 100 Adam steps per layer (--refine-steps auto on cpu)" in printed  # d_model 64
    hf = json.loads((out / "config.json").read_text())
    assert (hf["kv_lora_rank"], hf["qk_rope_head_dim"]) == (28, 4)


def test_convert_to_cla_says_the_result_is_kvforge_typed(tmp_path, capsys):
    out = tmp_path / "cla"
    assert main(["convert", STORIES, str(out), "--to", "cla", "--factor", "2", "--init", "first"]) == 0
    assert "kvforge-typed" in capsys.readouterr().out
    config = load_pretrained(out).config
    assert [spec.kv_from for spec in config.layers] == [None, 0, None, 2, None]


def test_convert_to_deltanet_writes_a_kvforge_typed_hybrid(tmp_path, capsys):
    out = tmp_path / "gdn"
    args = ["convert", STORIES, str(out), "--to", "deltanet", "--ratio", "3", "--transfer-steps", "2"]
    assert main([*args, "--calib", BOTCHAN, "--calib-tokens", "256", "--calib-seq-len", "128"]) == 0
    assert "kvforge-typed" in capsys.readouterr().out
    config = load_pretrained(out).config
    assert [spec.attention for spec in config.layers] == ["gqa"] + ["deltanet"] * 4  # keep=ends: layer 0


def test_convert_to_window_keeps_the_weights(tmp_path, capsys):
    out = tmp_path / "swa"
    assert main(["convert", STORIES, str(out), "--to", "window", "--windows", "64,64,64,64,none"]) == 0
    # per-layer windows export as Qwen2, and transformers builds Qwen2Tokenizer for any qwen2 config:
    # stories260K's SentencePiece-style vocabulary would be split differently, and the command says so
    printed = " ".join(capsys.readouterr().out.split())
    assert "Qwen2ForCausalLM" in printed and "WARNING: stock AutoTokenizer loads Qwen2Tokenizer" in printed
    assert "--tokenizer SRC" in printed
    converted, source = load_pretrained(out), load_pretrained(STORIES)
    assert [spec.window for spec in converted.config.layers] == [64, 64, 64, 64, None]
    for name, tensor in source.state_dict.items():
        assert torch.equal(converted.state_dict[name], tensor), name


def test_one_window_exports_as_mistral_and_keeps_the_tokenizer(tmp_path, capsys):
    assert main(["convert", STORIES, str(tmp_path / "w"), "--to", "window", "--windows", "64"]) == 0
    printed = " ".join(capsys.readouterr().out.split())
    assert "MistralForCausalLM" in printed and "AutoTokenizer" not in printed


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--to", "gqa", "--n-kv-heads", "3"], "n_kv_heads=3"),
        (["--to", "gqa", "--n-kv-heads", "8"], "n_kv_heads=8"),
        (["--to", "gqa"], "needs --n-kv-heads"),
        (["--to", "mla", "--kv-lora-rank", "4096", "--rope-dims", "4"], "kv_lora_rank=4096"),
        (["--to", "mla", "--kv-lora-rank", "28", "--rope-dims", "3"], "rope_dims=3"),
        (["--to", "mla", "--kv-lora-rank", "28", "--rope-dims", "16"], "rope_dims=16"),
        (["--to", "cla", "--factor", "9"], "factor=9"),
        (["--to", "window", "--windows", "100000"], "100000"),
        (["--to", "window", "--windows", "64,abc"], "'abc'"),
        (["--to", "gqa", "--n-kv-heads", "2", "--calib", "/no/such/file.txt"], "no such file"),
        (["--to", "deltanet", "--layers", "0,7"], "layers=[0, 7]"),
        (["--to", "linear", "--layers", "0,x"], "--layers '0,x'"),
    ],
)
def test_bad_options_are_clear_errors_and_write_nothing(tmp_path, capsys, options, message):
    out = tmp_path / "out"
    assert main(["convert", STORIES, str(out), *options]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_unknown_target_form_is_refused_by_the_parser(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["convert", STORIES, str(tmp_path / "out"), "--to", "mamba"])
    assert "invalid choice: 'mamba'" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["-1", "many"])
def test_bad_refine_steps_are_refused_by_the_parser(tmp_path, capsys, value):
    with pytest.raises(SystemExit):
        main(
            [
                "convert",
                STORIES,
                str(tmp_path / "out"),
                "--to",
                "gqa",
                "--n-kv-heads",
                "2",
                "--refine-steps",
                value,
            ]
        )
    assert f"{value!r} is not 'auto' or a number of steps >= 0" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_existing_output_is_refused_without_overwrite(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["convert", STORIES, str(out), "--to", "window", "--windows", "64"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize(
    "value, device, d_model, steps",
    [
        ("auto", "cuda", 4096, 100),  # a GPU refines an 8B model in minutes
        ("auto", "cpu", 512, 100),  # small models: seconds on the CPU
        ("auto", "cpu", 2048, 0),  # 0.95B on 2 cores: ~1 h of refinement against ~15 min of conversion
        (0, "cuda", 4096, 0),
        (50, "cpu", 4096, 50),
    ],
)
def test_refine_steps_auto_refines_where_it_is_cheap(value, device, d_model, steps):
    from kvforge.cli.convert import resolve_refine_steps

    assert resolve_refine_steps(value, torch.device(device), d_model) == steps
