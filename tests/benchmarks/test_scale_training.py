"""The scale benchmarks' smoke paths: ``benchmarks/gpu_uptrain.py --smoke`` (the script the GPU machine
runs, on a tiny shape on the CPU) trains with a teacher and reports the peak beside the estimate, with
the host allocator a training run has by default (glibc's mmap threshold pinned)."""

from __future__ import annotations

import argparse

from benchmarks import gpu_uptrain
from tests.training.helpers import expected_host_allocator


def test_gpu_uptrain_smoke_reports_speed_and_peak_beside_the_estimate(tmp_path):
    (row,) = gpu_uptrain.main(["--smoke", "--workdir", str(tmp_path)])
    assert row["shape"] == "smoke" and row["world"] == 1
    assert row["tokens_per_s"] > 0
    assert row["peak_kind"] == "rss"
    assert row["host_allocator"] == expected_host_allocator()
    assert 0.8 < row["peak_vs_estimate"] < 1.25  # a tiny model: mostly the process itself


def test_scale_train_job_reports_start_step_with_teacher_and_export(tmp_path):
    """``benchmarks/scale.py --jobs train`` runs scale_training in a subprocess and reads its rows back."""
    from benchmarks import scale, scale_training
    from benchmarks.scale_checkpoints import write_checkpoint

    checkpoint = write_checkpoint(scale_training.SHAPES["smoke"], tmp_path / "smoke")
    args = argparse.Namespace(workdir=str(tmp_path), device="cpu", train_options="--smoke")
    start, step, export = scale.train_job(args, "smoke", checkpoint)
    assert len(start) == len(step) == len(export) == len(scale.COLUMNS)
    assert start[1].startswith("train start (1 × auto") and start[4] > 0 and start[6] > 0
    assert step[1].startswith("train step with teacher") and step[5] > 0 and step[8] in ("yes", "NO")
    assert export[1] == "export (trained checkpoint)" and export[4] > 0 and export[6] > 0
