"""The scale benchmarks' smoke paths: ``benchmarks/gpu_uptrain.py --smoke`` (the script the GPU machine
runs, on a tiny shape on the CPU) trains with a teacher and reports the peak beside the estimate."""

from __future__ import annotations

from benchmarks import gpu_uptrain


def test_gpu_uptrain_smoke_reports_speed_and_peak_beside_the_estimate(tmp_path):
    (row,) = gpu_uptrain.main(["--smoke", "--workdir", str(tmp_path)])
    assert row["shape"] == "smoke" and row["world"] == 1
    assert row["tokens_per_s"] > 0
    assert row["peak_kind"] == "rss"
    assert 0.8 < row["peak_vs_estimate"] < 1.25  # a tiny model: mostly the process itself
