"""``backend="auto"``: the measured table decides, a backend that cannot run is skipped with one log
line per reason, and an explicitly named backend never falls back."""

from __future__ import annotations

import logging

import pytest
import torch

from kvforge.kernels import auto as auto_module
from kvforge.kernels import log as log_module
from kvforge.kernels.attention import BACKENDS, BackendUnavailable, attention, resolve_backend
from kvforge.kernels.auto import CASES, load_table, select_row


@pytest.fixture(autouse=True)
def _fresh_log_state():
    log_module._logged.clear()
    auto_module._runtime_failures.clear()
    yield
    log_module._logged.clear()
    auto_module._runtime_failures.clear()


def _use_table(monkeypatch, rows):
    monkeypatch.setattr(auto_module, "load_table", lambda: rows)


def _qkv(q_len=6, k_len=6, head_dim=8, v_dim=8):
    return (
        torch.randn(1, q_len, 4, head_dim),
        torch.randn(1, k_len, 2, head_dim),
        torch.randn(1, k_len, 2, v_dim),
    )


@pytest.mark.parametrize(
    ("kwargs", "q_len"),
    [({}, 6), ({"window": 2}, 6), ({"document_ids": torch.tensor([[0, 0, 1, 1, 1, 2]])}, 6), ({}, 1)],
)
def test_auto_is_sdpa_on_cpu(kwargs, q_len):
    q, k, v = _qkv(q_len=q_len)
    assert resolve_backend("auto", q, k=k, v=v, **kwargs) == "sdpa"


def test_shipped_table_names_registered_backends_and_known_cases():
    for row in load_table():
        assert set(row["order"]) <= set(BACKENDS), row
        assert row["case"] in (*CASES, "*"), row
        assert row["dtype"] in ("half", "float32", "*"), row
        assert row["source"], row


def test_the_most_specific_row_wins():
    rows = [
        {"device": "cuda", "dtype": "*", "case": "*", "min_keys": 0, "order": ["sdpa"]},
        {"device": "sm90", "dtype": "half", "case": "causal", "min_keys": 0, "order": ["sdpa-cudnn"]},
        {"device": "sm90", "dtype": "half", "case": "causal", "min_keys": 8192, "order": ["flex"]},
        {"device": "cuda", "dtype": "*", "case": "window", "min_keys": 0, "order": ["flex"]},
    ]
    assert select_row(rows, "sm90", "cuda", "half", "causal", 4096)["order"] == ["sdpa-cudnn"]
    assert select_row(rows, "sm90", "cuda", "half", "causal", 16384)["order"] == ["flex"]
    assert select_row(rows, "sm90", "cuda", "float32", "causal", 4096)["order"] == ["sdpa"]
    assert select_row(rows, "sm80", "cuda", "half", "window", 4096)["order"] == ["flex"]
    assert select_row(rows, "cpu", "cpu", "half", "causal", 4096) is None


def test_a_skipped_first_choice_is_logged_once(monkeypatch, caplog):
    _use_table(
        monkeypatch,
        [{"device": "cpu", "dtype": "*", "case": "*", "min_keys": 0, "order": ["sdpa-cudnn", "flex"]}],
    )
    q, k, v = _qkv()
    with caplog.at_level(logging.WARNING, logger="kvforge.kernels"):
        out = attention(q, k, v)
        attention(q, k, v)
    skips = [r.getMessage() for r in caplog.records if "instead of 'sdpa-cudnn'" in r.getMessage()]
    assert len(skips) == 1 and "using 'flex'" in skips[0]
    torch.testing.assert_close(out, attention(q, k, v, backend="eager"), rtol=1e-5, atol=1e-5)


def test_a_backend_failing_at_run_time_is_remembered_and_logged_once(monkeypatch, caplog):
    # torch's CPU flash kernel exists but refuses K/V of different widths for a decode query (which
    # is not padded to a common width): known only when it runs.
    _use_table(
        monkeypatch, [{"device": "cpu", "dtype": "*", "case": "*", "min_keys": 0, "order": ["sdpa-flash"]}]
    )
    q, k, v = _qkv(q_len=1, head_dim=8, v_dim=4)
    with caplog.at_level(logging.WARNING, logger="kvforge.kernels"):
        first = attention(q, k, v)
        second = attention(q, k, v)
    messages = [r.getMessage() for r in caplog.records if "sdpa-flash" in r.getMessage()]
    assert len(messages) == 1 and "using 'sdpa'" in messages[0]
    expected = attention(q, k, v, backend="eager")
    torch.testing.assert_close(first, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(second, expected, rtol=1e-5, atol=1e-5)


def test_auto_never_hands_a_mask_to_a_backend_without_masks(monkeypatch):
    _use_table(
        monkeypatch, [{"device": "cpu", "dtype": "*", "case": "*", "min_keys": 0, "order": ["flash", "flex"]}]
    )
    q, k, v = _qkv()
    assert resolve_backend("auto", q, k=k, v=v, document_ids=torch.tensor([[0, 0, 0, 1, 1, 1]])) == "flex"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
@pytest.mark.parametrize("backend", ["flash", "sdpa-efficient"])
def test_an_explicit_backend_never_falls_back(backend):
    q, k, v = _qkv()
    with pytest.raises(BackendUnavailable, match=backend.split("-")[-1]):
        attention(q, k, v, backend=backend)
