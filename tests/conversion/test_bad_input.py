"""Bad checkpoints and bad requests end in errors that say what is wrong and what would work."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from kvforge.arch import CausalLM
from kvforge.conversion import load_pretrained, save_pretrained
from kvforge.conversion import pretrained as pretrained_module
from tests.conftest import tiny_form
from tests.conversion.hf_tiny import save_hf_model


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return save_hf_model("llama", tmp_path_factory.mktemp("bad") / "llama")


@pytest.fixture
def llama_copy(llama_dir, tmp_path):
    return shutil.copytree(llama_dir, tmp_path / "copy")


def edit_config(path, **changes):
    config = json.loads((path / "config.json").read_text())
    for key, value in changes.items():
        if value is ...:
            config.pop(key, None)
        else:
            config[key] = value
    (path / "config.json").write_text(json.dumps(config))
    return path


def test_deepseek_checkpoint_with_moe_layers_is_refused(tmp_path):
    path = save_hf_model("deepseek_v3", tmp_path / "ds")
    edit_config(path, first_k_dense_replace=1)
    with pytest.raises(ValueError, match=r"mixture-of-experts checkpoint \(first_k_dense_replace=1"):
        load_pretrained(path)


def test_deepseek_config_without_first_k_dense_replace_means_moe_as_in_transformers(tmp_path):
    path = edit_config(save_hf_model("deepseek_v2-q-lora", tmp_path / "ds"), first_k_dense_replace=...)
    with pytest.raises(ValueError, match=r"first_k_dense_replace=0"):  # DeepseekV2Config's default
        load_pretrained(path)


def test_missing_weight_file_is_a_clear_error(llama_copy):
    (llama_copy / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"no weights found \(looked for model\.safetensors"):
        load_pretrained(llama_copy)


def test_missing_shard_named_by_the_index_is_a_clear_error(llama_copy):
    write_index(llama_copy, {"model.embed_tokens.weight": "model-00002-of-00002.safetensors"})
    with pytest.raises(FileNotFoundError, match=r"lists shard 'model-00002-of-00002\.safetensors'"):
        load_pretrained(llama_copy)


def test_missing_tensor_is_named(llama_copy):
    tensors = load_file(llama_copy / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, llama_copy / "model.safetensors")
    with pytest.raises(ValueError, match=r"missing tensors: model\.layers\.1\.mlp\.up_proj\.weight"):
        load_pretrained(llama_copy)


def test_tensor_of_the_wrong_shape_is_named(llama_copy):
    edit_config(llama_copy, num_key_value_heads=4)
    with pytest.raises(
        ValueError, match=r"wrong shapes: model\.layers\.0\.self_attn\.k_proj\.weight \(16, 64\)"
    ):
        load_pretrained(llama_copy)


def test_a_config_size_the_weights_disagree_with_names_the_key(llama_copy):
    edit_config(llama_copy, intermediate_size=95)
    with pytest.raises(ValueError, match=r"config.json has intermediate_size=95 but the weights hold 96"):
        load_pretrained(llama_copy)


def pickle_only(path):
    torch.save(load_file(path / "model.safetensors"), path / "pytorch_model.bin")
    (path / "model.safetensors").unlink()
    return path


def test_pickle_weights_are_refused_without_allow_pickle(llama_copy):
    with pytest.raises(ValueError, match=r"only pickle weights \(pytorch_model\.bin\).*allow_pickle=True"):
        load_pretrained(pickle_only(llama_copy))


def test_pickle_weights_load_with_allow_pickle(llama_dir, llama_copy):
    loaded = load_pretrained(pickle_only(llama_copy), allow_pickle=True).state_dict
    expected = load_pretrained(llama_dir).state_dict
    assert all(torch.equal(loaded[name], tensor) for name, tensor in expected.items())


def write_index(path, weight_map):
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


@pytest.mark.parametrize(
    "shard", ["../outside.safetensors", "/etc/passwd", "sub/../../x.safetensors", "C:\\x"]
)
def test_shard_index_pointing_outside_the_directory_is_refused(llama_copy, shard):
    write_index(llama_copy, {"model.embed_tokens.weight": shard})
    with pytest.raises(ValueError, match=r"points outside the model directory"):
        load_pretrained(llama_copy)


def test_shard_symlink_leaving_the_directory_is_refused(llama_copy, tmp_path):
    outside = tmp_path / "elsewhere.safetensors"
    shutil.copy(llama_copy / "model.safetensors", outside)
    (llama_copy / "link.safetensors").symlink_to(outside)
    write_index(llama_copy, {"model.embed_tokens.weight": "link.safetensors"})
    with pytest.raises(ValueError, match=r"resolves outside the model directory"):
        load_pretrained(llama_copy)


# (what is wrong, config.json changes, the message that must say so)
BAD_CONFIGS = [
    (
        "unknown-model-type",
        {"model_type": "gpt2"},
        r"model_type='gpt2' is not supported.*\['deepseek_v2', .*'qwen3'\]",
    ),
    (
        "needs-remote-code",
        {"model_type": "my_model", "auto_map": {"AutoModelForCausalLM": "modeling_x.X"}},
        r"needs the checkpoint's own modeling code.*never runs code",
    ),
    ("moe-model-type", {"model_type": "qwen2_moe"}, r"mixture-of-experts family"),
    (
        "missing-field",
        {"hidden_size": ...},
        r"config\.json: missing required key 'hidden_size' \(an integer\)",
    ),
    (
        "mistyped-field",
        {"num_hidden_layers": "3"},
        r"num_hidden_layers='3' has the wrong type: expected an integer",
    ),
    (
        "impossible-model",
        {"num_key_value_heads": 3},
        r"invalid llama model: .*n_kv_heads=3 must divide n_heads=8",
    ),
    ("activation", {"hidden_act": "gelu"}, r"hidden_act='gelu' is not supported"),
    ("quantized", {"quantization_config": {"quant_method": "fp8"}}, r"quantization_config is set"),
    (
        "rope-type",
        {"rope_parameters": {"rope_type": "dynamic", "factor": 2.0}},
        r"rope_type='dynamic' is not supported",
    ),
    ("partial-rope", {"partial_rotary_factor": 0.5}, r"partial_rotary_factor=0\.5 is not supported"),
    ("mlp-bias", {"mlp_bias": True}, r"mlp_bias=True is not supported"),
]


@pytest.mark.parametrize(
    ("changes", "match"), [case[1:] for case in BAD_CONFIGS], ids=[c[0] for c in BAD_CONFIGS]
)
def test_bad_config_is_refused_with_a_message_naming_the_problem(llama_copy, changes, match):
    with pytest.raises(ValueError, match=match):
        load_pretrained(edit_config(llama_copy, **changes))


def test_qwen_sliding_layer_types_without_a_window_size_are_refused(tmp_path):
    path = edit_config(save_hf_model("qwen2-layer-types", tmp_path / "q"), use_sliding_window=False)
    with pytest.raises(ValueError, match=r"sliding_attention layers but use_sliding_window is false"):
        load_pretrained(path)


def test_no_config_json_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"not a model directory: no config\.json"):
        load_pretrained(tmp_path)


def test_existing_output_directory_is_refused_without_overwrite(tmp_path):
    config = tiny_form("gqa")
    (tmp_path / "out").mkdir()
    with pytest.raises(FileExistsError, match=r"already exists; pass overwrite=True"):
        save_pretrained(config, CausalLM(config).state_dict(), tmp_path / "out")


def test_overwrite_replaces_an_existing_output_directory(tmp_path):
    config = tiny_form("gqa")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "stale.txt").write_text("old")
    out = save_pretrained(config, CausalLM(config).state_dict(), tmp_path / "out", overwrite=True)
    assert not (out / "stale.txt").exists() and (out / "config.json").exists()


def test_failure_while_writing_leaves_no_partial_output(tmp_path, monkeypatch):
    def fail_after_weights(*args, **kwargs):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(pretrained_module, "_copy_tokenizer", fail_after_weights)
    config = tiny_form("gqa")
    with pytest.raises(OSError, match="simulated"):
        save_pretrained(config, CausalLM(config).state_dict(), tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_state_dict_that_does_not_match_the_config_is_refused_before_writing(tmp_path):
    config = tiny_form("gqa")
    state_dict = CausalLM(config).state_dict()
    del state_dict["model.norm.weight"]
    with pytest.raises(ValueError, match=r"missing tensors: model\.norm\.weight"):
        save_pretrained(config, state_dict, tmp_path / "out")
    assert not (tmp_path / "out").exists()
