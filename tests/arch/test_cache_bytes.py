"""The cache allocates exactly the analytic byte count, for every form, length and dtype."""

from __future__ import annotations

import pytest
import torch

from kvforge.arch import CausalLM, describe_layers, kv_bytes_per_token, kv_cache_bytes
from kvforge.arch.presets import PRESETS
from tests.conftest import tiny_form


@pytest.mark.parametrize("seq_len", [1, 4, 5, 17, 64])
@pytest.mark.parametrize("form", PRESETS)
def test_cache_nbytes_equals_analytic_formula(form, seq_len):
    config = tiny_form(form)
    model = CausalLM(config)
    for dtype in (torch.float32, torch.bfloat16):
        cache = model.new_cache(batch=3, max_len=seq_len, dtype=dtype)
        assert cache.nbytes() == kv_cache_bytes(config, seq_len, dtype, batch=3)


def test_formula_by_hand_for_each_form():
    # tiny configs: 4 layers, 8 heads of 8 dims, window 5, MLA latent 24 + rope 4; fp32; 10 tokens.
    per_layer = {
        "mha": [2 * 8 * 8 * 10] * 4,
        "gqa": [2 * 2 * 8 * 10] * 4,
        "mqa": [2 * 1 * 8 * 10] * 4,
        "mla": [(24 + 4) * 10] * 4,
        "cla": [2 * 2 * 8 * 10, 0] * 2,
        "swa": [2 * 2 * 8 * 5] * 3 + [2 * 2 * 8 * 10],
        "mix": [(24 + 4) * 10, 2 * 2 * 8 * 5, 0, 0],
    }
    for form, expected in per_layer.items():
        config = tiny_form(form)
        assert kv_cache_bytes(config, 10, torch.float32) == 4 * sum(expected), form
        assert [row["bytes"] for row in describe_layers(config, 10, torch.float32)] == [
            4 * b for b in expected
        ]


@pytest.mark.parametrize("form", ["cla", "mix"])
def test_shared_layers_allocate_zero_bytes(form):
    config = tiny_form(form)
    cache = CausalLM(config).new_cache(2, 16)
    for index, spec in enumerate(config.layers):
        if spec.kv_from is not None:
            assert cache.layer_nbytes(index) == 0
            assert cache[index] is cache[spec.kv_from]
        else:
            assert cache.layer_nbytes(index) > 0


def test_window_cache_stops_growing_at_window():
    config = tiny_form("swa")
    assert (
        kv_cache_bytes(config, 1000) - kv_cache_bytes(config, 999) == 2 * 2 * 8 * 2
    )  # only the global layer grows
    assert kv_bytes_per_token(config, 10, "bf16") == kv_cache_bytes(config, 10, "bf16") / 10


def test_unknown_dtype_names_allowed_values():
    with pytest.raises(ValueError, match="allowed values"):
        kv_cache_bytes(tiny_form("gqa"), 8, "int3")
