"""kvforge models of every form export to the class that can express them and reload there with
the logits kvforge computes (stock transformers without remote code, or kvforge-typed with
trust_remote_code=True)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file

from kvforge.arch import CausalLM, LayerSpec, generate
from kvforge.conversion import load_pretrained, plan_export, save_pretrained
from tests.conftest import tiny_base, tiny_form
from tests.conversion.hf_tiny import load_hf, randomize_

LOGITS_ATOL = 1e-4


def windows(config, pattern):
    tiled = pattern * (config.n_layers // len(pattern))
    return config.replace(layers=[dataclasses.replace(s, window=w) for s, w in zip(config.layers, tiled)])


# name -> (config, family=None picks automatically, expected model_type)
TARGETS = {
    "gqa-to-llama": (lambda: tiny_form("gqa", tie_embeddings=True), None, "llama"),
    "llama-biases-to-llama": (lambda: tiny_form("mqa", attention_bias=True, o_proj_bias=True), None, "llama"),
    "uniform-window-to-mistral": (lambda: windows(tiny_form("gqa"), [5]), None, "mistral"),
    "qkv-biases-to-qwen2": (lambda: tiny_form("gqa", attention_bias=True), None, "qwen2"),
    "window-pattern-to-qwen2-with-zero-biases": (lambda: tiny_form("swa"), None, "qwen2"),
    "qk-norm-windows-to-qwen3": (lambda: windows(tiny_form("gqa", qk_norm=True), [5, None]), None, "qwen3"),
    "mla-to-deepseek_v3": (lambda: tiny_form("mla"), None, "deepseek_v3"),
    "mla-q-lora-to-deepseek_v3": (lambda: tiny_form("mla", q_lora_rank=16), None, "deepseek_v3"),
    "mla-to-deepseek_v2": (lambda: tiny_form("mla", q_lora_rank=16), "deepseek_v2", "deepseek_v2"),
    "gqa-forced-kvforge": (lambda: tiny_form("gqa"), "kvforge", "kvforge"),
    "cla-to-kvforge": (lambda: tiny_form("cla"), None, "kvforge"),
    "mix-to-kvforge": (lambda: tiny_form("mix", tie_embeddings=True), None, "kvforge"),
    "mla-rope-heads-to-kvforge": (lambda: tiny_form("mla", mla_rope_heads=2), None, "kvforge"),
    "two-window-sizes-to-kvforge": (lambda: windows(tiny_form("gqa"), [3, 5]), None, "kvforge"),
}


def token_ids(seq: int = 24) -> torch.Tensor:
    return torch.randint(0, 97, (2, seq), generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module", params=list(TARGETS))
def exported(request, tmp_path_factory):
    build, family, expected_type = TARGETS[request.param]
    torch.manual_seed(0)
    config = build()
    model = randomize_(CausalLM(config)).eval()
    out = save_pretrained(
        config, model.state_dict(), tmp_path_factory.mktemp(request.param) / "out", family=family
    )
    return model, out, expected_type


def test_export_goes_to_the_expected_family(exported):
    _, out, expected_type = exported
    assert json.loads((out / "config.json").read_text())["model_type"] == expected_type


def test_exported_model_reloads_in_transformers_with_kvforge_logits(exported):
    model, out, expected_type = exported
    hf_model = load_hf(out, trust_remote_code=expected_type == "kvforge")
    ids = token_ids()
    with torch.no_grad():
        assert (hf_model(ids).logits - model(ids)).abs().max().item() <= LOGITS_ATOL


def test_exported_model_reimports_with_the_same_tensors(exported):
    model, out, expected_type = exported
    reloaded, expected = load_pretrained(out).state_dict, model.state_dict()
    assert set(expected) <= set(reloaded)
    assert all(torch.equal(reloaded[k], v) for k, v in expected.items())
    # only a bias-free model exported as Qwen2 gains tensors: the q/k/v biases Qwen2 always has, zero
    added = set(reloaded) - set(expected)
    assert bool(added) == (expected_type == "qwen2" and not model.config.attention_bias)
    assert all(
        k.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias")) and not reloaded[k].any() for k in added
    )


def test_stock_exports_load_without_remote_code(exported):
    _, out, expected_type = exported
    config = json.loads((out / "config.json").read_text())
    assert ("auto_map" in config) == (expected_type == "kvforge")
    assert (out / "modeling_kvforge.py").exists() == (expected_type == "kvforge")


def test_kvforge_typed_generation_in_transformers_matches_kvforge(tmp_path):
    config = tiny_form("mix")
    model = randomize_(CausalLM(config)).eval()
    out = save_pretrained(config, model.state_dict(), tmp_path / "mix")
    hf_model = load_hf(out, trust_remote_code=True)
    prompt = token_ids(6)[:1]
    expected = generate(model, prompt, 20)
    assert hf_model.generate(prompt, max_new_tokens=20, do_sample=False).tolist() == expected.tolist()


def test_kvforge_typed_directory_is_read_without_running_its_modeling_file(tmp_path):
    config = tiny_form("cla")
    out = save_pretrained(config, CausalLM(config).state_dict(), tmp_path / "cla")
    (out / "modeling_kvforge.py").write_text("raise RuntimeError('kvforge must not execute this file')\n")
    assert load_pretrained(out).config == config


def test_tied_embeddings_are_stored_once(tmp_path):
    config = tiny_form("gqa", tie_embeddings=True)
    out = save_pretrained(config, CausalLM(config).state_dict(), tmp_path / "tied")
    assert "lm_head.weight" not in load_file(out / "model.safetensors")


def test_export_dtype_casts_floating_tensors_and_records_it(tmp_path):
    config = tiny_form("gqa")
    out = save_pretrained(config, CausalLM(config).state_dict(), tmp_path / "bf16", dtype="bf16")
    assert {t.dtype for t in load_file(out / "model.safetensors").values()} == {torch.bfloat16}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


def test_export_keeps_the_model_dtype_by_default(tmp_path):
    config = tiny_form("gqa")
    state_dict = {k: v.to(torch.float16) for k, v in CausalLM(config).state_dict().items()}
    out = save_pretrained(config, state_dict, tmp_path / "fp16")
    assert {t.dtype for t in load_file(out / "model.safetensors").values()} == {torch.float16}


def test_sharded_export_reloads_in_transformers_and_kvforge(tmp_path):
    config = tiny_base(n_layers=2)
    model = randomize_(CausalLM(config)).eval()
    out = save_pretrained(config, model.state_dict(), tmp_path / "sharded", max_shard_size="40KB")
    assert (out / "model.safetensors.index.json").exists() and not (out / "model.safetensors").exists()
    ids = token_ids()
    with torch.no_grad():
        assert (load_hf(out)(ids).logits - model(ids)).abs().max().item() <= LOGITS_ATOL
    assert all(torch.equal(load_pretrained(out).state_dict[k], v) for k, v in model.state_dict().items())


def test_plan_names_the_zero_biases_qwen2_export_writes():
    notes = plan_export(tiny_form("swa")).notes
    assert any("zeros" in note for note in notes)


def test_plan_notes_when_sliding_layers_are_not_the_last_ones():
    assert any(
        "max_window_layers" in note for note in plan_export(tiny_form("swa")).notes
    )  # local, local, local, global
    assert not any(
        "max_window_layers" in n for n in plan_export(windows(tiny_form("gqa"), [None, None, 5, 5])).notes
    )


def test_plan_warns_that_kvforge_typed_exports_do_not_load_in_stock_servers():
    notes = plan_export(tiny_form("cla")).notes
    assert any("vLLM" in note and "NOT load" in note for note in notes)


def test_save_pretrained_logs_a_warning_when_it_writes_kvforge_typed(tmp_path, caplog):
    config = tiny_form("cla")
    save_pretrained(config, CausalLM(config).state_dict(), tmp_path / "cla")
    assert any(r.levelname == "WARNING" and "NOT load" in r.getMessage() for r in caplog.records)


def test_named_family_that_cannot_hold_the_model_is_refused_with_the_ones_that_can():
    with pytest.raises(
        ValueError, match=r"cannot export as mistral: some layers slide.*\['qwen2', 'kvforge'\]"
    ):
        plan_export(windows(tiny_form("gqa"), [5, None]), "mistral")


def test_mixed_window_layers_with_shared_kv_are_kvforge_typed():
    config = tiny_base().replace(layers=[LayerSpec("gqa", 2, 4), LayerSpec("gqa", 2, 4, kv_from=0)] * 2)
    assert plan_export(config).family.model_type == "kvforge"
