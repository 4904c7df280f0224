"""The report: a JSON file with exactly the documented fields, and non-empty PNG plots."""

from __future__ import annotations

import dataclasses
import json

import matplotlib.image
import pytest
import torch

from kvforge.evaluation import evaluate_model
from kvforge.evaluation.plots import PLOTS, pareto_front, plot_recovery_vs_bytes, write_plots
from kvforge.evaluation.report import EvalReport, new_report, write_json
from kvforge.evaluation.schema import schema_markdown, schema_paths
from tests.conftest import REPO
from tests.evaluation.helpers import quick_settings, stories260k


@pytest.fixture(scope="module")
def model_report():
    torch.manual_seed(0)
    return evaluate_model(stories260k(), quick_settings())


def _json_paths(value: dict, prefix: str, documented: set[str]) -> set[str]:
    """Paths of a JSON object in schema notation, descending where the schema documents sub-fields."""
    paths = set()
    for key, item in value.items():
        path = f"{prefix}{key}"
        paths.add(path)
        if isinstance(item, dict) and any(p.startswith(f"{path}.") for p in documented):
            paths |= _json_paths(item, f"{path}.", documented)
        if isinstance(item, list) and any(p.startswith(f"{path}[].") for p in documented):
            for element in item:
                paths |= _json_paths(element, f"{path}[].", documented)
    return paths


def test_json_has_every_documented_field_and_nothing_else(model_report, tmp_path):
    report = new_report(quick_settings(), [model_report], torch.device("cpu"))
    data = json.loads(write_json(report, tmp_path / "eval.json").read_text())
    documented = set(schema_paths(EvalReport))
    assert _json_paths(data, "", documented) == documented


def test_every_json_field_has_a_description():
    undocumented = [path for path, text in schema_paths(EvalReport).items() if not text.strip()]
    assert undocumented == []
    assert "| `models[].passkey.cells[].accuracy` |" in schema_markdown(EvalReport)


def test_plots_are_written_and_non_empty(model_report, tmp_path):
    smaller = dataclasses.replace(
        model_report, name="half-kv", kv_bytes_per_token=model_report.kv_bytes_per_token / 2
    )
    written = write_plots([model_report, smaller], tmp_path)
    assert sorted(written) == sorted(PLOTS)
    for path in written.values():
        with open(path, "rb") as handle:
            assert handle.read(8) == b"\x89PNG\r\n\x1a\n"
        height, width, _ = matplotlib.image.imread(path).shape
        assert height > 100 and width > 100


def test_no_plot_is_written_without_its_data(model_report, tmp_path):
    bare = dataclasses.replace(
        model_report, perplexity=[], perplexity_vs_context=[], passkey=None, latency=[]
    )
    assert write_plots([bare], tmp_path) == {}
    assert list(tmp_path.iterdir()) == []


def test_recovery_plot_is_written_with_and_without_a_control(tmp_path):
    rows = {"mqa": (7680.0, 4.9, 3.6), "mla": (11520.0, 4.1, 3.5)}
    for control in (3.4, None):
        path = plot_recovery_vs_bytes(rows, (23040.0, 3.3), control, tmp_path / f"{control}.png", "NLL")
        height, width, _ = matplotlib.image.imread(path).shape
        assert height > 100 and width > 100


def test_pareto_front_keeps_models_no_other_beats_on_bytes_and_quality():
    points = [(1280, 1.32), (640, 1.50), (640, 1.40), (320, 2.0), (960, 1.45)]
    assert pareto_front(points) == [(320, 2.0), (640, 1.40), (1280, 1.32)]


def test_json_reference_in_docs_is_up_to_date():
    reference = (REPO / "docs" / "evaluation-json.md").read_text()
    assert schema_markdown(EvalReport) in reference, "regenerate the table with `kvforge eval --schema`"


def test_kv_figures_are_at_the_evaluated_context_and_cache_dtype():
    """A window-5 bf16 model evaluated at 16 tokens: its KV bytes/token are those of 16 tokens in bf16
    (its cache's dtype), not of max_seq_len (64) tokens in fp32, and the summary says which."""
    from kvforge.arch import describe_layers, kv_bytes_per_token
    from kvforge.evaluation.report import summary_rows
    from tests.evaluation.helpers import tiny_eval_model

    loaded = tiny_eval_model("swa")
    loaded.model.to(torch.bfloat16)
    config = loaded.model.config
    settings = quick_settings(tasks=["memory"], corpora=[], context=16, contexts=[16], decode_steps=1)
    report = evaluate_model(loaded, settings)
    assert (report.kv_context, report.kv_dtype) == (16, "bfloat16")
    assert report.kv_bytes_per_token == kv_bytes_per_token(config, 16, "bf16")
    assert report.kv_bytes_per_token != kv_bytes_per_token(config, config.max_seq_len, "fp32")
    assert [row.bytes for row in report.layers] == [
        row["bytes"] for row in describe_layers(config, 16, "bf16")
    ]
    assert summary_rows([report])[0][2] == f"{report.kv_bytes_per_token:,.0f} (16, bfloat16)"
