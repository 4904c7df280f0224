"""HF directory → kvforge → the same family again: identical tensors, the same config, same model."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from safetensors.torch import load_file

from kvforge.conversion import load_pretrained, save_pretrained
from tests.conversion.hf_tiny import VARIANTS, save_hf_model

# Keys whose value may change without changing the model: MoE routing sizes are unused when every
# layer is dense, and layer_types supersedes max_window_layers.
UNUSED_ON_REEXPORT = {"n_group", "n_routed_experts", "num_experts_per_tok", "topk_group", "max_window_layers"}
# deepseek_v3-rotate-half is re-exported in the interleaved layout (rope_interleave=true), see below.
SAME_LAYOUT = [name for name in VARIANTS if name != "deepseek_v3-rotate-half"]


@pytest.fixture(scope="module")
def round_trip(tmp_path_factory):
    """variant -> (source dir, re-exported dir, imported Pretrained), built once per variant."""
    done = {}

    def build(variant):
        if variant not in done:
            root = tmp_path_factory.mktemp(variant)
            source = save_hf_model(variant, root / "hf")
            pretrained = load_pretrained(source)
            out = save_pretrained(
                pretrained.config, pretrained.state_dict, root / "out", family=pretrained.family
            )
            done[variant] = source, out, pretrained
        return done[variant]

    return build


@pytest.mark.parametrize("variant", SAME_LAYOUT)
def test_reexport_to_the_source_family_writes_identical_tensors(round_trip, variant):
    source, out, _ = round_trip(variant)
    expected, actual = load_file(source / "model.safetensors"), load_file(out / "model.safetensors")
    assert actual.keys() == expected.keys()
    assert all(torch.equal(actual[name], expected[name]) for name in expected)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_reexport_keeps_every_model_defining_config_value(round_trip, variant):
    source, out, _ = round_trip(variant)
    before = transformers.AutoConfig.from_pretrained(source).to_dict()
    after = transformers.AutoConfig.from_pretrained(out).to_dict()
    written = json.loads((source / "config.json").read_text())
    changed = {k for k in written if before.get(k) != after.get(k)} - UNUSED_ON_REEXPORT
    assert changed == ({"rope_interleave"} if variant == "deepseek_v3-rotate-half" else set())


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_reimport_gives_the_same_model_config(round_trip, variant):
    _, out, pretrained = round_trip(variant)
    assert load_pretrained(out).config == pretrained.config


def test_rotate_half_deepseek_is_reexported_with_interleaved_rotary_rows(round_trip):
    source, out, _ = round_trip("deepseek_v3-rotate-half")
    config = json.loads((out / "config.json").read_text())
    expected, actual = load_file(source / "model.safetensors"), load_file(out / "model.safetensors")
    name = "model.layers.0.self_attn.kv_a_proj_with_mqa.weight"
    latent, rope = config["kv_lora_rank"], config["qk_rope_head_dim"]
    assert config["rope_interleave"] is True
    assert torch.equal(actual[name][:latent], expected[name][:latent])
    # interleaved row 2i is the rotate-half row i, row 2i+1 is row i + rope/2
    assert torch.equal(actual[name][latent::2], expected[name][latent : latent + rope // 2])
    assert torch.equal(actual[name][latent + 1 :: 2], expected[name][latent + rope // 2 :])
