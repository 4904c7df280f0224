"""The KV study skeleton: runnable rows give numbers, phase-2 cells stay empty, reruns resume."""

from __future__ import annotations

import json

import pytest

from benchmarks import kv_study
from tests.conftest import shared_path

QUICK = ["--max-tokens", "1100", "--repeats", "1"]


def _study(out, *arguments: str):
    return kv_study.main(
        ["--source", str(shared_path("stories260K-mha")), "--out", str(out), *QUICK, *arguments]
    )


@pytest.fixture
def counted(monkeypatch):
    """Count how often each measurement really runs."""
    calls: dict[str, int] = {}
    for name, (measure, cached) in list(kv_study.MEASUREMENTS.items()):
        if measure is None:
            continue

        def wrapper(model, data, _measure=measure, _name=name):
            calls[_name] = calls.get(_name, 0) + 1
            return _measure(model, data)

        monkeypatch.setitem(kv_study.MEASUREMENTS, name, (wrapper, cached))
    return calls


def test_rerun_skips_the_measurements_already_saved(tmp_path, counted):
    first = _study(tmp_path, "--rows", "mha,gqa-2")
    assert counted == {
        "kv_bytes_per_token": 2,
        "zero_shot_nll": 2,
        "heldout_nll": 2,
        "decode_tokens_per_s": 2,
    }
    counted.clear()
    again = _study(tmp_path, "--rows", "mha,gqa-2,mqa")
    # Only the new row is measured; decode speed is re-measured for every row (same-run ratios).
    assert counted == {
        "kv_bytes_per_token": 1,
        "zero_shot_nll": 1,
        "heldout_nll": 1,
        "decode_tokens_per_s": 3,
    }
    assert again["gqa-2"]["zero_shot_nll"] == first["gqa-2"]["zero_shot_nll"]
    saved = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert sorted(saved) == ["gqa-2", "mha", "mqa"]
    assert "decode_tokens_per_s" not in saved["mha"]


def test_rows_and_phase_two_cells(tmp_path):
    results = _study(tmp_path, "--rows", "mha,swa-64,mla-1/4")
    assert results["swa-64"]["kv_bytes_per_token"] == pytest.approx(
        results["mha"]["kv_bytes_per_token"] * 64 / 512
    )
    assert results["mha"]["uptrained_distill_nll"] is None
    assert all(value is None for value in results["mla-1/4"].values())


def test_results_measured_with_other_settings_are_not_mixed_in(tmp_path):
    _study(tmp_path, "--rows", "mha")
    with pytest.raises(ValueError, match=r"holds results measured with other settings.*--redo"):
        kv_study.main(
            [
                "--source",
                str(shared_path("stories260K-mha")),
                "--out",
                str(tmp_path),
                "--max-tokens",
                "900",
                "--rows",
                "mha",
            ]
        )
