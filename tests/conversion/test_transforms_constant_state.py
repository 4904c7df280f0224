"""to_linear / to_deltanet: which layers convert, how they start from the source's projections, and that
attention transfer (a few steps on the new parameters) brings each layer closer to its source."""

from __future__ import annotations

import pytest
import torch

from kvforge.arch import CausalLM, LayerSpec
from kvforge.conversion.transforms import check_options, to_deltanet, to_linear
from kvforge.conversion.transforms.constant_state import kept_layers
from tests.conftest import tiny_base
from tests.conversion.stories_data import calibration_ids, loss, stories


def _source(n_layers: int = 4):
    config = tiny_base(n_layers=n_layers, pattern=[LayerSpec("gqa", 2)])
    return config, CausalLM(config).eval()


@pytest.mark.parametrize(
    ("keep", "ratio", "expected"),
    [
        ("even", 3, [3, 7]),
        ("even", 1, [1, 3, 5, 7]),
        ("ends", 3, [0, 7]),
        ("ends", 1, [0, 1, 6, 7]),
        ("even", 7, [7]),
    ],
)
def test_kept_layers_follow_the_ratio_and_strategy(keep, ratio, expected):
    assert kept_layers(8, ratio, keep) == expected


def test_keep_by_error_keeps_the_worst_fitted_layers():
    assert kept_layers(6, 2, "error", {0: 0.1, 1: 0.9, 2: 0.2, 3: 0.5, 4: 0.3, 5: 0.05}) == [1, 3]


def test_layout_converts_three_of_four_and_keeps_the_rest():
    config, model = _source(8)
    new_config, _ = to_deltanet(config, model.state_dict(), transfer_steps=0, ratio=3, keep="even")
    forms = [spec.attention for spec in new_config.layers]
    assert forms == ["deltanet"] * 3 + ["gqa"] + ["deltanet"] * 3 + ["gqa"]
    default, _ = to_deltanet(config, model.state_dict(), transfer_steps=0)  # keep="ends": 0 and 7
    assert [spec.attention for spec in default.layers] == ["gqa"] + ["deltanet"] * 6 + ["gqa"]
    assert all(spec.n_kv_heads == 2 for spec in new_config.layers)


def test_linear_init_with_a_window_over_the_context_is_the_source_exactly():
    # The softmax window covers every calibration position, so the identity-initialised layer is softmax.
    config, model = _source()
    ids = torch.randint(0, 97, (2, 20))
    new_config, state_dict = to_linear(
        config, model.state_dict(), transfer_steps=0, layers=[0, 1, 2, 3], window=32
    )
    converted = CausalLM(new_config).eval()
    converted.load_state_dict(state_dict)
    with torch.no_grad():
        torch.testing.assert_close(converted(ids), model(ids), rtol=0, atol=1e-5)


@pytest.mark.parametrize("transform", [to_linear, to_deltanet])
def test_attention_transfer_lowers_each_layers_error(transform):
    config, model = _source()
    calibration = torch.randint(0, 97, (2, 24))
    options = {"layers": [0, 1, 2, 3], "sequential": False}
    if transform is to_linear:
        options["window"] = 4
    before, after = {}, {}
    transform(config, model.state_dict(), calibration, transfer_steps=0, report=before, **options)
    transform(config, model.state_dict(), calibration, transfer_steps=20, report=after, **options)
    assert all(after["errors"][i] < before["errors"][i] for i in range(4)), (before, after)


@pytest.mark.parametrize(
    ("transform", "names"),
    [(to_linear, ("window_factors",)), (to_deltanet, ("a_proj.weight", "b_proj.weight", "g_proj.weight"))],
)
def test_attention_transfer_moves_the_new_parameters_that_start_at_zero(transform, names):
    """The transfer's rate is absolute: a rate relative to each tensor's size would leave these at zero."""
    config, model = _source(2)
    calibration = torch.randint(0, 97, (2, 24))
    options = {"layers": [0, 1], "sequential": False, "transfer_steps": 5}
    if transform is to_linear:
        options["window"] = 4
    _, state_dict = transform(config, model.state_dict(), calibration, **options)
    for name in names:
        assert state_dict[f"model.layers.0.self_attn.{name}"].abs().max() > 1e-3, name  # Adam: ~lr a step


def test_keep_error_reports_what_it_measured():
    config, model = _source()
    report = {}
    new_config, _ = to_linear(
        config,
        model.state_dict(),
        torch.randint(0, 97, (2, 16)),
        keep="error",
        ratio=1,
        transfer_steps=5,
        report=report,
    )
    kept = [i for i, spec in enumerate(new_config.layers) if spec.attention == "gqa"]
    assert kept == kept_layers(4, 1, "error", report["measured"])


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"layers": [0, 9]}, r"layers=\[0, 9\] must be distinct layer indices in 0..3"),
        ({"keep": "middle"}, r"keep='middle'"),
        ({"ratio": 0}, r"ratio=0"),
        ({"transfer": "some"}, r"transfer='some'"),
        ({"window": -2}, r"window=-2"),
    ],
)
def test_bad_options_are_refused_before_any_weight(options, match):
    config, _ = _source()
    with pytest.raises(ValueError, match=match):
        check_options("linear", config, **options)


def test_a_layer_reading_a_converted_layers_kv_is_refused():
    config = tiny_base(pattern=[LayerSpec("gqa", 2), LayerSpec("gqa", kv_from=-1)])
    with pytest.raises(ValueError, match="layer 1 reads layer 0's K/V"):
        check_options("deltanet", config, layers=[0])


def test_transfer_without_calibration_is_a_clear_error():
    config, model = _source()
    with pytest.raises(ValueError, match="calibration"):
        to_deltanet(config, model.state_dict())


@pytest.mark.slow
@pytest.mark.parametrize("transform", [to_linear, to_deltanet])
def test_attention_transfer_improves_stories260k(transform):
    source = stories("stories260K")
    base = loss(source.config, source.state_dict)
    untrained = loss(*transform(source.config, source.state_dict, calibration_ids(4, 256), transfer_steps=0))
    transferred = loss(
        *transform(source.config, source.state_dict, calibration_ids(8, 256), transfer_steps=60)
    )
    assert base < transferred < untrained
