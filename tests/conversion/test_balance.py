"""After a K/V merge, each value head and the o_proj columns reading it are rescaled (by powers of two)
to sit equally near the source's scales: the logits do not change, the weights' scales do."""

from __future__ import annotations

import math

import pytest
import torch

from kvforge.conversion.transforms import layerwise, to_cla, to_gqa
from kvforge.conversion.transforms.balance import power_of_two
from tests.conversion.stories_data import calibration_ids, evaluation_ids, logits, stories

# transform -> (source, conversion); CLA from the 4-K/V-head stories260K: its fit pairs the heads of a
# group's layers over every permutation (8! for stories260K-mha's 8, minutes).
TRANSFORMS = {
    "mqa": (
        "stories260K-mha",
        lambda config, weights: to_gqa(config, weights, calibration_ids(), n_kv_heads=1),
    ),
    "cla-2": ("stories260K", lambda config, weights: to_cla(config, weights, calibration_ids(), factor=2)),
}


def _rms(tensor: torch.Tensor) -> float:
    return float(tensor.double().pow(2).mean().sqrt())


@pytest.fixture(scope="module", params=list(TRANSFORMS))
def converted(request):
    """(source, balanced, unbalanced) for one merge of stories260K(-mha)."""
    name, convert = TRANSFORMS[request.param]
    source = stories(name)
    balanced = convert(source.config, source.state_dict)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(layerwise, "balance_values", lambda *args: [])
        unbalanced = convert(source.config, source.state_dict)
    return source, balanced, unbalanced


def test_balancing_leaves_the_logits_unchanged(converted):
    _, balanced, unbalanced = converted
    ids = evaluation_ids(129)[None, :128]
    difference = (logits(*balanced, ids) - logits(*unbalanced, ids)).abs().max().item()
    assert difference <= 1e-6  # powers of two rescale exactly: measured 0.0


def _imbalance(source, state_dict, index: int) -> float:
    """log2 of (value rows' RMS / source's) over (o_proj's RMS / source's) for layer ``index``."""
    name = f"model.layers.{index}.self_attn."
    value = _rms(state_dict[name + "v_proj.weight"]) / _rms(source.state_dict[name + "v_proj.weight"])
    output = _rms(state_dict[name + "o_proj.weight"]) / _rms(source.state_dict[name + "o_proj.weight"])
    return math.log2(output / value)


def test_balanced_values_and_o_proj_sit_equally_near_the_source_scale(converted):
    source, (config, balanced), (_, unbalanced) = converted
    owners = [i for i, spec in enumerate(config.layers) if spec.kv_from is None]
    before = [_imbalance(source, unbalanced, index) for index in owners]
    after = [_imbalance(source, balanced, index) for index in owners]
    assert max(abs(x) for x in before) > 1.0  # the merge left o_proj > 2x further off than v_proj
    assert max(abs(x) for x in after) <= 1.0 + 1e-9  # one head, rounding to 2^k: within a factor 2


def test_power_of_two_rounds_in_log_scale():
    assert power_of_two(3.0) == 4.0 and power_of_two(0.3) == 0.25 and power_of_two(1.2) == 1.0
    assert power_of_two(0.0) == 1.0 and power_of_two(float("nan")) == 1.0
