"""vLLM/SGLang config lint: each known way a converted model fails on a serving engine (TransMLA#24,
TransMLA#32) is a failing check, and kvforge's own stock exports pass."""

from __future__ import annotations

import copy
import json

import pytest

from kvforge.conversion import load_pretrained, save_pretrained
from kvforge.conversion.checkpoint import checkpoint_entries
from kvforge.conversion.serving_lint import lint_config, lint_serving
from tests.conversion.hf_tiny import save_hf_model


@pytest.fixture(scope="module")
def deepseek_export(tmp_path_factory):
    """kvforge's DeepseekV3 export of a tiny MLA model (untied head, rms_norm_eps 1e-5)."""
    root = tmp_path_factory.mktemp("lint")
    source = load_pretrained(save_hf_model("deepseek_v3", root / "hf"))
    out = save_pretrained(source.config, source.state_dict, root / "export")
    hf = json.loads((out / "config.json").read_text())
    shapes = {name: entry.shape for name, entry in checkpoint_entries(out).items()}
    return out, hf, shapes


def errors(findings):
    return {finding.key for finding in findings if finding.level == "error"}


def test_kvforge_deepseek_export_passes(deepseek_export):
    out, _, _ = deepseek_export
    findings = lint_serving(out)
    assert errors(findings) == set()
    assert [f.key for f in findings] == ["rms_norm_eps"]  # a warning: vLLM's latent norm eps


def test_kvforge_llama_export_passes():
    from tests.conftest import shared_path

    assert lint_serving(shared_path("stories260K")) == []


FAILURE_MODES = {
    # TransMLA#24: converted without --deepseek-style -> "vllm or sglang will not recognize LlamaMLAForCausalLM"
    "unregistered architecture": (
        lambda hf, s: hf.update(architectures=["LlamaMLAForCausalLM"]),
        "architectures",
    ),
    # TransMLA#32: its own vLLM model code -> "MLACommonImpl.__init__() got an unexpected keyword argument"
    "own modeling code": (
        lambda hf, s: hf.update(auto_map={"AutoModelForCausalLM": "m.LlamaMLA"}),
        "auto_map",
    ),
    # TransMLA#24 with --deepseek-style: serves, "responding requests with nonsense characters"
    "rotary rows in halves": (lambda hf, s: hf.update(rope_interleave=False), "rope_interleave"),
    "tied head": (
        lambda hf, s: (hf.update(tie_word_embeddings=True), s.pop("lm_head.weight")),
        "tie_word_embeddings",
    ),
    "attention biases": (lambda hf, s: hf.update(attention_bias=True), "attention_bias"),
    "non-default rope scaling": (
        lambda hf, s: hf.update(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}),
        "rope_scaling",
    ),
    "MLA sizes off the weights": (
        lambda hf, s: hf.update(kv_lora_rank=32),
        "self_attn.kv_a_proj_with_mqa.weight",
    ),
    # TransMLA#23/#24: a dense model left with MoE layers (DeepseekV3's defaults: 256 experts from layer 3)
    "MoE layers in a dense model": (
        lambda hf, s: hf.update(first_k_dense_replace=1),
        "first_k_dense_replace",
    ),
    "null expert count": (lambda hf, s: hf.update(n_routed_experts=None), "n_routed_experts"),
}


@pytest.mark.parametrize("mode", list(FAILURE_MODES))
def test_known_failure_mode_is_an_error(deepseek_export, mode):
    _, hf, shapes = deepseek_export
    hf, shapes = copy.deepcopy(hf), dict(shapes)
    mutate, key = FAILURE_MODES[mode]
    assert key not in errors(lint_config(hf, shapes))
    mutate(hf, shapes)
    assert key in errors(lint_config(hf, shapes))
