"""Baseline transforms: exactness where the algebra allows it, and clear errors."""

from __future__ import annotations

import pytest
import torch

from kvforge.arch import CausalLM
from kvforge.conversion import load_pretrained
from kvforge.conversion.transforms import to_cla, to_gqa, to_window
from tests.conftest import shared_path, tiny_form
from tests.conversion.stories_data import logits


def test_stories260k_mha_to_gqa4_reproduces_stories260k():
    mha = load_pretrained(shared_path("stories260K-mha"))
    gqa = load_pretrained(shared_path("stories260K"))
    config, state_dict = to_gqa(mha.config, mha.state_dict, n_kv_heads=4)
    ids = torch.randint(0, 512, (2, 64))
    expected = logits(gqa.config, gqa.state_dict, ids)
    assert (logits(config, state_dict, ids) - expected).abs().max().item() <= 1e-5


def test_to_gqa_with_all_heads_is_identity():
    config = tiny_form("mha")
    source = CausalLM(config).state_dict()
    new_config, new_state = to_gqa(config, source, n_kv_heads=config.n_heads)
    assert new_config.layers == config.layers
    assert all(torch.equal(new_state[k], v) for k, v in source.items())


def test_transforms_do_not_modify_their_inputs():
    config = tiny_form("mha")
    source = CausalLM(config).state_dict()
    snapshot = {k: v.clone() for k, v in source.items()}
    to_gqa(config, source, n_kv_heads=2)
    to_cla(config, source, factor=2, init="mean")
    assert source.keys() == snapshot.keys()
    assert all(torch.equal(source[k], snapshot[k]) for k in source)


def test_to_cla_drops_the_kv_projections_of_sharing_layers():
    config, state_dict = to_cla(
        tiny_form("gqa", n_layers=5), CausalLM(tiny_form("gqa", n_layers=5)).state_dict(), factor=2
    )
    assert [spec.kv_from for spec in config.layers] == [None, 0, None, 2, None]
    assert "model.layers.1.self_attn.k_proj.weight" not in state_dict
    CausalLM(config).load_state_dict(state_dict)  # strict: exactly the expected parameters


def test_to_window_tiles_the_pattern_and_keeps_weights():
    source = CausalLM(tiny_form("gqa")).state_dict()
    config, state_dict = to_window(tiny_form("gqa"), source, windows=[3, None])
    assert [spec.window for spec in config.layers] == [3, None, 3, None]
    assert state_dict.keys() == source.keys()


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda c, s: to_gqa(c, s, n_kv_heads=3), r"n_kv_heads=3 must divide n_heads=8"),
        (lambda c, s: to_gqa(c, s, n_kv_heads=2, method="svd"), r"method='svd'"),
        (lambda c, s: to_cla(c, s, factor=1), r"factor=1 must be in 2\.\.n_layers=4"),
        (lambda c, s: to_window(c, s, windows=[3, 3, 3]), r"length 3 must divide n_layers=4"),
    ],
)
def test_bad_transform_options_are_clear_errors(call, match):
    config = tiny_form("mha")
    with pytest.raises(ValueError, match=match):
        call(config, CausalLM(config).state_dict())
