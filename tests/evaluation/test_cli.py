"""`kvforge eval` end to end on the real checkpoint, and its errors for bad input."""

from __future__ import annotations

import json

from kvforge.cli.main import main
from tests.conftest import shared_path
from tests.evaluation.helpers import TINYSTORIES

QUICK = [
    "--max-tokens", "600", "--contexts", "96,128", "--passkey-trials", "1", "--passkey-depths", "0,1",
    "--passkey-digits", "3", "--latency-batches", "1", "--decode-steps", "4", "--repeats", "1", "--device", "cpu",
]  # fmt: skip


def _eval(*arguments: str) -> int:
    return main(["eval", *arguments])


def test_kvforge_eval_writes_json_plots_and_a_table(tmp_path, capsys):
    out = tmp_path / "eval"
    code = _eval(
        str(shared_path("stories260K")), "--text", str(shared_path(*TINYSTORIES)), "--out", str(out), *QUICK
    )
    assert code == 0
    report = json.loads((out / "eval.json").read_text())
    assert [m["name"] for m in report["models"]] == ["stories260K"]
    assert sorted(p.name for p in out.glob("*.png")) == [
        "decode_speed.png",
        "nll_vs_context.png",
        "pareto.png",
        "retrieval.png",
    ]
    printed = capsys.readouterr().out
    assert "stories260K: perplexity" in printed and "KV cache and speed" in printed


def test_schema_flag_prints_every_field(capsys):
    assert _eval("--schema") == 0
    assert "| `models[].memory[].measured_cache_bytes` |" in capsys.readouterr().out


def _error(capsys, *arguments: str) -> str:
    assert _eval(*arguments) == 2
    return capsys.readouterr().err


def test_context_longer_than_the_model_supports_is_a_clear_error(tmp_path, capsys):
    err = _error(capsys, str(shared_path("stories260K")), "--text", str(shared_path(*TINYSTORIES)),
                 "--context", "1024", "--out", str(tmp_path), *QUICK)  # fmt: skip
    assert "context=1024 is outside 1..512: the model supports at most max_seq_len=512" in err


def test_empty_eval_file_is_a_clear_error(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    err = _error(
        capsys, str(shared_path("stories260K")), "--text", str(empty), "--out", str(tmp_path), *QUICK
    )
    assert "empty.txt is empty: nothing to score" in err


def test_directory_that_is_not_a_model_is_a_clear_error(tmp_path, capsys):
    err = _error(capsys, str(tmp_path), "--tasks", "memory", "--out", str(tmp_path / "out"))
    assert "is not a model directory: no config.json" in err


def test_unreadable_checkpoint_is_a_clear_error(tmp_path, capsys):
    checkpoint = tmp_path / "last.ckpt"
    checkpoint.write_bytes(b"")
    err = _error(capsys, str(checkpoint), "--tasks", "memory", "--out", str(tmp_path / "out"))
    assert "last.ckpt is not a readable PyTorch checkpoint" in err


def test_unknown_task_is_a_clear_error(tmp_path, capsys):
    err = _error(
        capsys, str(shared_path("stories260K")), "--tasks", "perplexity,mmlu", "--out", str(tmp_path)
    )
    assert (
        "tasks ['mmlu'] are not known; allowed: ['perplexity', 'context', 'passkey', 'needles', 'memory']"
        in err
    )


def test_existing_report_is_not_overwritten_without_the_flag(tmp_path, capsys):
    (tmp_path / "eval.json").write_text("{}")
    err = _error(capsys, str(shared_path("stories260K")), "--tasks", "memory", "--out", str(tmp_path))
    assert "eval.json already exists; pass --overwrite" in err


def test_only_the_requested_tasks_run(tmp_path):
    out = tmp_path / "eval"
    code = _eval(str(shared_path("stories260K")), "--text", str(shared_path(*TINYSTORIES)), "--tasks", "context",
                 "--out", str(out), "--no-plots", *QUICK)  # fmt: skip
    assert code == 0
    (model,) = json.loads((out / "eval.json").read_text())["models"]
    assert [r["context"] for r in model["perplexity_vs_context"]] == [96, 128]
    assert (model["perplexity"], model["passkey"], model["memory"], model["latency"]) == ([], None, [], [])
