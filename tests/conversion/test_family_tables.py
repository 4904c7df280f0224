"""The family tables themselves: complete, invertible, and faithful to transformers' config classes."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import transformers

from kvforge.arch import CausalLM, ModelConfig
from kvforge.cli.export import FAMILY_CHOICES
from kvforge.conversion import FAMILIES, load_pretrained, plan_export
from kvforge.conversion.families import EXPORT_PREFERENCE
from kvforge.conversion.families.layers import MLA_FIELDS
from kvforge.conversion.families.schema import ConfigReader
from tests.conftest import tiny_form
from tests.conversion.hf_tiny import load_hf, save_hf_model

# How to run a model, not what it computes: no config.json key carries these.
RUNTIME_FIELDS = {"init_std", "attention_backend", "mla_absorb", "extra"}
STOCK = [family for family in FAMILIES.values() if family.stock]
CONFIG_CLASSES = {
    "llama": transformers.LlamaConfig,
    "mistral": transformers.MistralConfig,
    "qwen2": transformers.Qwen2Config,
    "qwen3": transformers.Qwen3Config,
    "deepseek_v2": transformers.DeepseekV2Config,
    "deepseek_v3": transformers.DeepseekV3Config,
    "gemma2": transformers.Gemma2Config,
    "gemma3_text": transformers.Gemma3TextConfig,
}
# Only the keys our tables require; everything else takes the default of both sides.
MINIMAL = dict(
    vocab_size=97, hidden_size=256, intermediate_size=96, num_hidden_layers=4, num_attention_heads=32
)
MINIMAL_MLA = dict(
    MINIMAL,
    num_attention_heads=128,
    kv_lora_rank=16,
    q_lora_rank=None,
    qk_rope_head_dim=8,
    qk_nope_head_dim=8,
    v_head_dim=8,
    first_k_dense_replace=4,
)


@pytest.mark.parametrize("family", STOCK, ids=lambda f: f.model_type)
def test_every_model_config_field_is_decided_by_each_stock_table(family):
    all_fields = {f.name for f in dataclasses.fields(ModelConfig)}
    assert all_fields - RUNTIME_FIELDS - family.fields == set()


@pytest.mark.parametrize("family", STOCK, ids=lambda f: f.model_type)
def test_absent_keys_read_as_the_transformers_config_class_defaults(family):
    minimal = MINIMAL_MLA if family.model_type.startswith("deepseek") else MINIMAL
    ours = family.read_config(ConfigReader(dict(minimal), "minimal"))
    theirs = CONFIG_CLASSES[family.model_type](**minimal)
    assert ours.max_seq_len == theirs.max_position_embeddings
    assert ours.norm_eps == theirs.rms_norm_eps
    assert ours.tie_embeddings == theirs.tie_word_embeddings
    if family.model_type == "gemma3_text":  # one RoPE entry per layer type
        assert ours.rope_theta == theirs.rope_parameters["full_attention"]["rope_theta"]
        assert ours.window_rope_theta == theirs.rope_parameters["sliding_attention"]["rope_theta"]
    else:
        assert ours.rope_theta == theirs.rope_parameters["rope_theta"]
    assert ours.rope_scaling is None
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id) == (
        theirs.bos_token_id,
        theirs.eos_token_id,
        theirs.pad_token_id,
    )
    assert ours.attention_bias == getattr(theirs, "attention_bias", family.model_type == "qwen2")
    if family.model_type.startswith("gemma"):
        assert ours.mlp_activation == theirs.hidden_activation
        assert ours.query_pre_attn_scalar == theirs.query_pre_attn_scalar
        assert ours.final_logit_softcap == theirs.final_logit_softcapping
        assert ours.attn_logit_softcap == theirs.attn_logit_softcapping
    if ours.layers[0].attention == "gqa":
        assert ours.n_kv_heads == theirs.num_key_value_heads
        assert ours.head_dim == (getattr(theirs, "head_dim", None) or 256 // 32)
        sliding = getattr(theirs, "layer_types", None) or ["full_attention"] * 4
        expected = [theirs.sliding_window if t == "sliding_attention" else None for t in sliding]
        if family.model_type == "mistral":
            expected = [theirs.sliding_window] * 4
        assert [spec.window for spec in ours.layers] == expected


def test_deepseek_v3_default_kv_heads_differing_from_the_head_count_is_refused():
    minimal = dict(MINIMAL_MLA, num_attention_heads=32)  # DeepseekV3Config defaults num_key_value_heads=128
    with pytest.raises(ValueError, match=r"num_key_value_heads=128 must equal num_attention_heads=32"):
        FAMILIES["deepseek_v3"].read_config(ConfigReader(minimal, "minimal"))


GEMMA_RECIPE = dict(
    mlp_activation="gelu_pytorch_tanh",
    norm_unit_offset=True,
    sandwich_norms=True,
    embed_scale=True,
    query_pre_attn_scalar=16,
    tie_embeddings=True,
)
EXPRESSIBLE = {
    "llama": lambda: tiny_form("gqa", attention_bias=True, o_proj_bias=True, tie_embeddings=True),
    "mistral": lambda: tiny_form("mqa").replace(pattern=[{"n_kv_heads": 1, "window": 7}]),
    "qwen2": lambda: tiny_form("swa", attention_bias=True),
    "qwen3": lambda: tiny_form("swa", qk_norm=True, max_seq_len=128),
    "deepseek_v2": lambda: tiny_form("mla", q_lora_rank=12, eos_token_id=[2, 3]),
    "deepseek_v3": lambda: tiny_form(
        "mla", rope_scaling={"type": "yarn", "factor": 4.0, "original_max_seq_len": 16, "mscale_all_dim": 1.0}
    ),
    "gemma2": lambda: tiny_form("swa", **GEMMA_RECIPE, attn_logit_softcap=50.0, final_logit_softcap=30.0),
    "gemma3_text": lambda: tiny_form(
        "swa",
        **GEMMA_RECIPE,
        qk_norm=True,
        window_rope_theta=10000.0,
        rope_scaling={"type": "linear", "factor": 8.0},
    ),
}


def meaningful(config: ModelConfig) -> dict:
    """The fields that change what the model computes: ``layers`` holds the resolved ``pattern`` and
    each layer's ``n_kv_heads`` (the model-wide one is only the default they were resolved from)."""
    skip = {"pattern", "n_kv_heads"} | RUNTIME_FIELDS
    if config.forms == {"mla"}:
        skip |= {"head_dim", "qk_norm"}  # unused by MLA layers; head_dim only sets the MHA baseline
    else:
        skip |= set(MLA_FIELDS)
    return {k: v for k, v in dataclasses.asdict(config).items() if k not in skip}


@pytest.mark.parametrize("name", list(EXPRESSIBLE))
def test_writing_then_reading_a_table_gives_back_the_config(name):
    family, config = FAMILIES[name], EXPRESSIBLE[name]()
    written = json.loads(json.dumps(family.write_config(config)))
    assert meaningful(family.read_config(ConfigReader(written, "written"))) == meaningful(config)


@pytest.mark.parametrize("name", list(EXPRESSIBLE))
def test_what_a_table_writes_reads_back_the_same_through_the_pinned_transformers(name):
    """Every key a table writes keeps its name and meaning in the transformers config class: the class
    built from our config.json serialises to one our table reads back as the same model. A transformers
    upgrade that renames, drops or reinterprets a key fails here."""
    family, config = FAMILIES[name], EXPRESSIBLE[name]()
    written = json.loads(json.dumps(family.write_config(config)))
    theirs = transformers.AutoConfig.for_model(written.pop("model_type"), **written).to_dict()
    assert meaningful(family.read_config(ConfigReader(theirs, "transformers"))) == meaningful(config)


@pytest.mark.parametrize(
    ("form", "expected"),
    [
        ("mha", "llama"),
        ("gqa", "llama"),
        ("mqa", "llama"),
        ("swa", "qwen2"),
        ("mla", "deepseek_v3"),
        ("cla", "kvforge"),
        ("mix", "kvforge"),
    ],
)
def test_automatic_export_picks_the_simplest_class_that_holds_each_form(form, expected):
    assert plan_export(tiny_form(form)).family.model_type == expected


def test_export_preference_lists_only_stock_families():
    assert all(family.stock for family in EXPORT_PREFERENCE)


def test_cli_family_choices_are_the_families():
    assert set(FAMILY_CHOICES) == {"auto", *FAMILIES}


def test_transformers_4_style_rope_keys_import_like_transformers(tmp_path):
    """A config with top-level rope_theta and legacy rope_scaling {"type": ...} (no rope_parameters)."""
    path = save_hf_model("deepseek_v3-q-lora-yarn", tmp_path / "legacy")
    config = json.loads((path / "config.json").read_text())
    scaling = config.pop("rope_parameters")
    config["rope_theta"] = scaling.pop("rope_theta")
    config["rope_scaling"] = {"type": scaling.pop("rope_type"), **scaling}
    (path / "config.json").write_text(json.dumps(config))
    pretrained = load_pretrained(path)
    assert pretrained.config.rope_scaling.type == "yarn"
    model = CausalLM(pretrained.config).eval()
    model.load_state_dict(pretrained.state_dict)
    ids = torch.randint(0, 101, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (load_hf(path)(ids).logits - model(ids)).abs().max().item() <= 1e-4


def test_gemma3_transformers_4_rope_keys_import_like_transformers():
    """rope_theta + rope_scaling (global layers) and rope_local_base_freq (sliding layers)."""
    legacy = dict(
        MINIMAL,
        rope_theta=500000.0,
        rope_local_base_freq=2000.0,
        rope_scaling={"rope_type": "linear", "factor": 8.0},
    )
    ours = FAMILIES["gemma3_text"].read_config(ConfigReader(dict(legacy), "legacy"))
    theirs = transformers.Gemma3TextConfig(**legacy).rope_parameters
    assert ours.rope_theta == theirs["full_attention"]["rope_theta"] == 500000.0
    assert (ours.rope_scaling.type, ours.rope_scaling.factor) == (
        "linear",
        theirs["full_attention"]["factor"],
    )
    assert ours.window_rope_theta == theirs["sliding_attention"]["rope_theta"] == 2000.0


def test_gemma3_export_writes_the_transformers_4_rope_keys_beside_rope_parameters():
    """Servers pinned to transformers 4.x read rope_theta/rope_scaling/rope_local_base_freq: the export
    writes them, and they alone describe the same model as rope_parameters (to us and to transformers)."""
    legacy = dict(
        MINIMAL,
        rope_theta=500000.0,
        rope_local_base_freq=2000.0,
        rope_scaling={"rope_type": "linear", "factor": 8.0},
    )
    family = FAMILIES["gemma3_text"]
    config = family.read_config(ConfigReader(dict(legacy), "legacy"))
    written = family.write_config(config)
    assert (written["rope_theta"], written["rope_local_base_freq"]) == (500000.0, 2000.0)
    assert written["rope_scaling"]["factor"] == 8.0
    flat_only = {k: v for k, v in written.items() if k != "rope_parameters"}
    assert family.read_config(ConfigReader(flat_only, "flat")) == config
    both = transformers.Gemma3TextConfig(**written).rope_parameters
    assert both == transformers.Gemma3TextConfig(**flat_only).rope_parameters
