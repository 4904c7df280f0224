"""benchmarks.real_uptrain: the hybrid's window list, the recovery arithmetic, and (slow) the --smoke path."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.real_uptrain import Settings, hybrid_windows, report

ROOT = Path(__file__).resolve().parents[2]


def test_hybrid_keeps_one_global_layer_in_six_and_the_last():
    assert hybrid_windows(8, 128).split(",") == ["128"] * 5 + ["none", "128", "none"]
    assert hybrid_windows(30, 512).split(",").count("none") == 5


def test_recovery_is_the_share_of_the_zero_shot_loss_closed_against_the_control():
    settings = Settings("src", 30, 2, 256, 3e-4, 3, 0.5, 8, 4096, 128)
    record = {"kv_bytes_per_token": 100.0, "train_s": 1.0}
    rows = {
        "control": {**record, "zero_shot": 3.0, "uptrained": 2.9},
        "mqa": {**record, "zero_shot": 5.0, "uptrained": 3.4, "convert_s": 2.0},
    }
    columns, table = report(rows, settings, source_loss=3.0, source_bytes=300.0)
    mqa = dict(zip(columns, table[1]))
    assert mqa["zero-shot Δ"] == "+2.0000" and mqa["vs control"] == "+0.5000"
    assert mqa["recovered"] == "75 %" and mqa["tokens"] == "15,360" and mqa["KV bytes vs source"] == "0.333"


@pytest.mark.slow
def test_smoke_runs_the_whole_path_on_stories260k(tmp_path):
    """In a subprocess: the smoke trains models, and tests that read this process's peak RSS
    (tests/benchmarks/test_scale_training.py) must not see them."""
    command = [sys.executable, "-m", "benchmarks.real_uptrain", "--smoke", "--out", str(tmp_path)]
    done = subprocess.run(
        [*command, "--plots", str(tmp_path)], capture_output=True, text=True, cwd=ROOT, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    out = done.stdout
    assert "mqa" in out and "control" in out
    assert (tmp_path / "results.json").exists() and (tmp_path / "real_pareto.png").exists()
