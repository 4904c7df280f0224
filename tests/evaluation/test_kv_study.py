"""The KV study: every row gives numbers, uptraining runs through the training stack, reruns resume."""

from __future__ import annotations

import json

import pytest

from benchmarks import kv_study
from benchmarks.kv_study_rows import Row
from tests.conftest import shared_path

# Toy sizes: a few hundred evaluation tokens, one optimizer step of 2 x 32 tokens, 2 calibration rows.
QUICK = ["--max-tokens", "1100", "--repeats", "1", "--steps", "1", "--block", "32", "--batch", "2",
         "--warmup", "0", "--calibration-sequences", "2"]  # fmt: skip


def _study(out, *arguments: str):
    return kv_study.main(
        ["--source", str(shared_path("stories260K-mha")), "--out", str(out), *QUICK, *arguments]
    )


@pytest.fixture
def counted(monkeypatch):
    """Count how often each measurement really runs (returns a value)."""
    calls: dict[str, int] = {}
    for name, (measure, cached) in list(kv_study.MEASUREMENTS.items()):

        def wrapper(models, data, _measure=measure, _name=name):
            value = _measure(models, data)
            if value is not None:
                calls[_name] = calls.get(_name, 0) + 1
            return value

        monkeypatch.setitem(kv_study.MEASUREMENTS, name, (wrapper, cached))
    return calls


def test_rerun_skips_the_measurements_already_saved(tmp_path, counted):
    first = _study(tmp_path, "--rows", "gqa-4,swa-64")
    assert counted == {
        "kv_bytes_per_token": 2,
        "zero_shot_nll": 2,
        "heldout_nll": 2,
        "decode_tokens_per_s": 2,
    }
    counted.clear()
    again = _study(tmp_path, "--rows", "gqa-4,swa-64,mqa")
    # Only the new row is measured (and uptrained); decode speed is re-measured for every row.
    assert counted == {
        "kv_bytes_per_token": 1,
        "zero_shot_nll": 1,
        "heldout_nll": 1,
        "uptrained_ce_nll": 1,
        "uptrained_distill_nll": 1,
        "decode_tokens_per_s": 3,
    }
    assert again["gqa-4"]["zero_shot_nll"] == first["gqa-4"]["zero_shot_nll"]
    saved = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert sorted(saved) == ["gqa-4", "mqa", "swa-64"]
    assert "decode_tokens_per_s" not in saved["mqa"]


def test_uptrained_rows_change_the_converted_weights_and_write_the_plots(tmp_path):
    results = _study(tmp_path, "--rows", "mha,gqa-2,swa-64")
    gqa = results["gqa-2"]
    assert gqa["uptrained_ce_nll"] != gqa["heldout_nll"] != gqa["uptrained_distill_nll"]
    assert gqa["uptrained_ce_nll"] != gqa["uptrained_distill_nll"]  # the teacher changes the update
    assert results["swa-64"]["uptrained_distill_nll"] is None  # a zero-shot-only row
    assert results["swa-64"]["kv_bytes_per_token"] == pytest.approx(
        results["mha"]["kv_bytes_per_token"] * 64 / 512
    )
    assert gqa["kv_bytes_per_token"] == pytest.approx(results["mha"]["kv_bytes_per_token"] / 4)
    for name in ("pareto.png", "uptraining.png", "decode_speed.png"):
        assert (tmp_path / name).stat().st_size > 1000, name


def test_mla_rows_hold_a_quarter_and_an_eighth_of_the_mha_cache(tmp_path):
    results = _study(tmp_path, "--rows", "mha,mla-1/4,mla-1/8", "--steps", "0")
    mha = results["mha"]["kv_bytes_per_token"]
    assert results["mla-1/4"]["kv_bytes_per_token"] == pytest.approx(mha / 4)
    assert results["mla-1/8"]["kv_bytes_per_token"] == pytest.approx(mha / 8)


def test_results_measured_with_another_budget_are_not_mixed_in(tmp_path):
    _study(tmp_path, "--rows", "gqa-4")
    with pytest.raises(ValueError, match=r"holds results measured with other settings.*--redo"):
        _study(tmp_path, "--rows", "gqa-4", "--lr", "0.002")


def test_a_row_whose_definition_changed_is_measured_again(tmp_path, counted, monkeypatch):
    _study(tmp_path, "--rows", "gqa-4,swa-64", "--steps", "0")
    counted.clear()
    changed = Row("window 32 on every layer", ({"to": "window", "windows": 32},), uptrain=False)
    monkeypatch.setitem(kv_study.ROWS, "swa-64", changed)
    results = _study(tmp_path, "--rows", "gqa-4,swa-64", "--steps", "0")
    assert counted["zero_shot_nll"] == 1  # swa-64 only
    # 8 K/V heads for 32 of 512 positions = 4 K/V heads for all 512, / 8
    assert results["swa-64"]["kv_bytes_per_token"] == pytest.approx(
        results["gqa-4"]["kv_bytes_per_token"] / 8
    )


def test_skipped_measurements_are_not_taken_and_a_later_run_takes_them(tmp_path, counted):
    first = _study(tmp_path, "--rows", "mqa", "--skip", "uptrained_ce_nll,decode_tokens_per_s")
    assert "uptrained_ce_nll" not in counted and "decode_tokens_per_s" not in counted
    assert first["mqa"]["uptrained_ce_nll"] is None and first["mqa"]["uptrained_distill_nll"] is not None
    counted.clear()
    _study(tmp_path, "--rows", "mqa")
    assert counted == {"uptrained_ce_nll": 1, "decode_tokens_per_s": 1}


def test_an_unknown_measurement_to_skip_names_the_allowed_ones(tmp_path):
    with pytest.raises(SystemExit, match="uptrained_ce_nll"):
        _study(tmp_path, "--rows", "mqa", "--skip", "ce")
