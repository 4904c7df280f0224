"""`kvforge inspect --batch` reports the training and inference memory estimates of kvforge.arch.memory."""

from __future__ import annotations

import json

from kvforge.arch.memory import estimate_inference_memory, estimate_training_memory
from kvforge.cli.main import main
from kvforge.conversion import load_config
from tests.conftest import shared_path

STORIES = shared_path("stories260K")


def test_inspect_json_reports_training_and_inference_memory(capsys):
    assert (
        main(["inspect", str(STORIES), "--seq-len", "256", "--batch", "8", "--dtype", "bf16", "--json"]) == 0
    )
    memory = json.loads(capsys.readouterr().out)["memory"]
    config = load_config(STORIES)[0]
    training = estimate_training_memory(config, 8, 256, param_dtype="fp32", activation_dtype="bf16")
    inference = estimate_inference_memory(config, 8, 256, "bf16")
    assert (
        memory["training"]["total"] == training.total
        and memory["training"]["activations"] == training.activations
    )
    assert memory["inference"]["kv_cache"] == inference.kv_cache == 8 * 256 * 640
    assert memory["training"]["suggestion"] == training.suggestion()


def test_inspect_table_prints_the_memory_table(capsys):
    assert main(["inspect", str(STORIES), "--seq-len", "256", "--batch", "8"]) == 0
    out = capsys.readouterr().out
    assert "batch 8 × 256 tokens" in out and "optimizer state" in out and "KV cache" in out
    assert "largest training share" in out


def test_inspect_refuses_a_non_positive_batch(capsys):
    assert main(["inspect", str(STORIES), "--batch", "0"]) == 2
    assert "--batch=0: must be a positive number" in capsys.readouterr().err


def test_inspect_counts_a_sharded_teacher_and_fsdp2_gathers():
    from kvforge.cli.inspect import summarize

    path = str(shared_path("stories260K-mha"))
    plain = summarize(path, 64, "bf16", batch=2)["memory"]["training"]
    fsdp = summarize(path, 64, "bf16", batch=2, shards=2, teacher="self")["memory"]["training"]
    assert plain["teacher"] == 0 and plain["gathered"] == 0
    assert fsdp["teacher"] > 0 and fsdp["gathered"] > 0
    assert fsdp["parameters"] == plain["parameters"] // 2
