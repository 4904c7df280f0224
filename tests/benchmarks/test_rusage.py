"""benchmarks.rusage: a command's peak RSS is its own, not the caller's resident set at fork."""

from __future__ import annotations

import sys

import psutil
import torch  # noqa: F401 (resident in this process, as in the benchmark)

from benchmarks.real_model_quality import run_measured


def test_the_callers_memory_is_not_counted_in_the_commands_peak(tmp_path):
    resident = psutil.Process().memory_info().rss / 2**30  # this process holds torch: > 0.2 GiB
    assert resident > 0.2
    code, _, _, peak = run_measured([sys.executable, "-c", "pass"], tmp_path / "run.log")
    assert code == 0
    assert peak < 0.1, peak  # a bare interpreter; a direct child of this process would report ≥ resident


def test_the_commands_exit_status_comes_back(tmp_path):
    code, _, _, _ = run_measured([sys.executable, "-c", "raise SystemExit(3)"], tmp_path / "run.log")
    assert code == 3
