"""`kvforge export` and `kvforge inspect` as a user runs them."""

from __future__ import annotations

import json

import pytest

from kvforge.arch import CausalLM
from kvforge.cli.main import build_parser, main
from kvforge.conversion import save_pretrained
from tests.conftest import shared_path, tiny_form


@pytest.fixture(scope="module")
def cla_dir(tmp_path_factory):
    config = tiny_form("cla")
    return save_pretrained(config, CausalLM(config).state_dict(), tmp_path_factory.mktemp("cli") / "cla")


def test_inspect_json_reports_forms_parameters_and_kv_ratio_of_stories260k(capsys):
    assert main(["inspect", str(shared_path("stories260K")), "--seq-len", "512", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["parameters"] == 260_032
    assert [row["form"] for row in report["layers"]] == ["gqa-4"] * 5
    # 5 layers x 2 (K, V) x 4 heads x 8 dims x 2 bytes; MHA would have 8 heads
    assert report["kv_bytes_per_token"] == 640 and report["kv_ratio_vs_mha"] == 0.5
    assert report["stock"] is True


def test_inspect_table_shows_shared_layers_and_says_kvforge_typed(cla_dir, capsys):
    assert main(["inspect", str(cla_dir), "--seq-len", "64"]) == 0
    out = capsys.readouterr().out
    assert "shared from layer 0" in out
    assert "kvforge-typed" in out and "vLLM" in out


def test_export_of_a_stock_model_says_which_class_and_servers_load_it(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["export", str(shared_path("stories260K")), str(out), "--dtype", "bf16"]) == 0
    printed = capsys.readouterr().out
    assert "LlamaForCausalLM" in printed and "vLLM" in printed and "WARNING" not in printed
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


def test_export_to_kvforge_typed_warns_that_stock_servers_will_not_load_it(cla_dir, tmp_path, capsys):
    assert main(["export", str(cla_dir), str(tmp_path / "out")]) == 0
    printed = " ".join(capsys.readouterr().out.split())
    assert "WARNING" in printed and "vLLM and SGLang will NOT load this directory" in printed


def test_export_refuses_an_existing_output_before_reading(cla_dir, tmp_path, capsys):
    (tmp_path / "out").mkdir()
    assert main(["export", str(cla_dir), str(tmp_path / "out")]) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err


def test_export_of_an_unreadable_checkpoint_file_is_a_clear_error(tmp_path, capsys):
    checkpoint = tmp_path / "last.ckpt"
    checkpoint.write_bytes(b"not a checkpoint")
    assert main(["export", str(checkpoint), str(tmp_path / "out")]) == 2
    assert "is not a readable PyTorch checkpoint" in capsys.readouterr().err


def test_export_to_a_family_that_cannot_hold_the_model_is_an_error(cla_dir, tmp_path, capsys):
    assert main(["export", str(cla_dir), str(tmp_path / "out"), "--family", "llama"]) == 2
    assert "cannot export as llama: layer 1 reads the K/V of layer 0" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("command", "options"),
    [
        ("export", ["--family", "--dtype", "--overwrite", "--allow-pickle", "--max-shard-size"]),
        ("inspect", ["--seq-len", "--dtype", "--json"]),
    ],
)
def test_help_explains_every_option(command, options):
    parser = build_parser()
    sub = parser._subparsers._group_actions[0].choices[command]
    documented = {opt: action.help for action in sub._actions for opt in action.option_strings}
    assert all(documented.get(option) for option in options)
