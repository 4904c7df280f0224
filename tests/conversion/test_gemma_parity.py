"""Gemma 2 and Gemma 3 text: export back to transformers with its logits, cached decoding, what the
families refuse, and the answer for a Llama-family window hybrid (import parity, greedy generation and
re-export with identical tensors run for the ``gemma2``/``gemma3_text`` variants of
``test_import_parity.py`` and ``test_export_roundtrip.py``)."""

from __future__ import annotations

import json

import pytest
import torch

from kvforge.arch import CausalLM, kv_cache_bytes
from kvforge.conversion import load_pretrained, plan_export, save_pretrained
from kvforge.conversion.convert import convert_checkpoint
from kvforge.conversion.transforms import to_window
from tests.conftest import GEMMA3_TRAITS, tiny_form
from tests.conversion.hf_tiny import load_hf, randomize_, save_hf_model
from tests.conversion.test_import_parity import LOGITS_ATOL, kvforge_model, token_ids

GEMMAS = ["gemma2", "gemma3_text"]


@pytest.fixture(scope="module")
def gemma(tmp_path_factory):
    """variant -> (source dir, imported Pretrained), built once per variant."""
    done = {}

    def build(variant):
        if variant not in done:
            path = save_hf_model(variant, tmp_path_factory.mktemp(variant) / "hf")
            done[variant] = path, load_pretrained(path)
        return done[variant]

    return build


@pytest.mark.parametrize("variant", GEMMAS)
def test_export_without_a_family_picks_the_gemma_class_and_transformers_reproduces_kvforge(
    gemma, variant, tmp_path
):
    _, pretrained = gemma(variant)
    assert plan_export(pretrained.config).family.model_type == variant
    out = save_pretrained(pretrained.config, pretrained.state_dict, tmp_path / "out")
    assert json.loads((out / "config.json").read_text())["model_type"] == variant
    ids = token_ids(2, 24)
    with torch.no_grad():
        expected = kvforge_model(pretrained)(ids)
        assert (load_hf(out)(ids).logits - expected).abs().max().item() <= LOGITS_ATOL
    assert load_pretrained(out).config == pretrained.config


@pytest.mark.parametrize("variant", GEMMAS)
def test_gemma_cached_decode_equals_the_uncached_forward_and_cache_bytes_match(gemma, variant):
    _, pretrained = gemma(variant)
    model = kvforge_model(pretrained)
    ids = token_ids(2, 14)
    cache = model.new_cache(2, 16)
    with torch.no_grad():
        steps = [model(ids[:, :6], cache=cache)]
        steps += [model(ids[:, i : i + 1], cache=cache) for i in range(6, 14)]
        assert (torch.cat(steps, dim=1) - model(ids)).abs().max().item() <= 1e-5
    assert cache.nbytes() == kv_cache_bytes(pretrained.config, 16, torch.float32, batch=2)


def test_norm_renames_keep_kvforge_llama_names_and_gemma_names_on_disk(gemma, tmp_path):
    """Gemma's post_attention_layernorm follows attention; kvforge's (Llama's) precedes the MLP."""
    source, pretrained = gemma("gemma2")
    hf_model = load_hf(source)
    layer = hf_model.model.layers[1]
    sd = pretrained.state_dict
    assert torch.equal(
        sd["model.layers.1.attention_output_layernorm.weight"], layer.post_attention_layernorm.weight
    )
    assert torch.equal(
        sd["model.layers.1.post_attention_layernorm.weight"], layer.pre_feedforward_layernorm.weight
    )
    assert torch.equal(
        sd["model.layers.1.post_feedforward_layernorm.weight"], layer.post_feedforward_layernorm.weight
    )


@pytest.mark.parametrize("variant", GEMMAS)
def test_streamed_conversion_of_a_gemma_checkpoint_equals_the_in_memory_transform(gemma, variant, tmp_path):
    source, pretrained = gemma(variant)
    options = {"windows": [3, None, 3]}  # shorter windows on the layers that already slide
    out, _, streamed = convert_checkpoint(source, tmp_path / "out", "window", options, calibration=None)
    config, state_dict = to_window(pretrained.config, pretrained.state_dict, **options)
    assert streamed == config
    ids = token_ids(2, 24)
    model = CausalLM(config).eval()
    model.load_state_dict(state_dict)
    with torch.no_grad():
        assert (load_hf(out)(ids).logits - model(ids)).abs().max().item() <= LOGITS_ATOL


def _edited(source, tmp_path, **changes):
    out = tmp_path / "edited"
    out.mkdir()
    for item in source.iterdir():
        (out / item.name).write_bytes(item.read_bytes())
    config = json.loads((source / "config.json").read_text())
    config.update(changes)
    (out / "config.json").write_text(json.dumps(config))
    return out


@pytest.mark.parametrize(
    ("variant", "changes", "match"),
    [
        ("gemma3_text", {"use_bidirectional_attention": True}, r"use_bidirectional_attention=true .* causal"),
        ("gemma2", {"use_bidirectional_attention": True}, r"use_bidirectional_attention=true"),
        ("gemma3_text", {"attn_logit_softcapping": 50.0}, r"Gemma3Attention does not apply it"),
        ("gemma2", {"hidden_activation": "relu"}, r"mlp_activation='relu': allowed values are"),
        ("gemma3_text", {"model_type": "gemma3"}, r"multimodal wrapper.*gemma3_text"),
        (
            "gemma3_text",
            {
                "rope_parameters": {
                    "sliding_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}
                }
            },
            r"sliding layers without scaling",
        ),
    ],
)
def test_gemma_configs_kvforge_cannot_run_exactly_are_refused_by_name(
    gemma, tmp_path, variant, changes, match
):
    source, _ = gemma(variant)
    with pytest.raises(ValueError, match=match):
        load_pretrained(_edited(source, tmp_path, **changes))


def test_gemma3_export_of_an_attention_softcapped_model_is_refused_naming_gemma2(gemma):
    _, pretrained = gemma("gemma3_text")
    capped = pretrained.config.replace(attn_logit_softcap=20.0)
    with pytest.raises(ValueError, match=r"Gemma 3 does not soft-cap attention scores \(gemma2 does\)"):
        plan_export(capped, "gemma3_text")


# ---------------------------------------------------------------- Llama window hybrid -> Gemma 3
def test_llama_window_hybrid_cannot_be_a_stock_gemma3_and_the_refusal_names_qwen2():
    """Gemma 3 always applies GeGLU, 1 + w norms, sandwich norms on the attention and MLP outputs,
    q/k norms and scaled embeddings; no choice of weights turns a norm into the identity, so a
    Llama-family model (SwiGLU, no output norms, no q/k norm) has no exact Gemma 3 form. The stock
    class that does express a Llama window hybrid is Qwen2 (layer_types, zero q/k/v biases)."""
    hybrid = tiny_form("gqa").replace(pattern=[{"window": 5}, {}])
    assert plan_export(hybrid).family.model_type == "qwen2"
    with pytest.raises(ValueError, match=r"cannot export as gemma3_text: Gemma 3 always has") as refused:
        plan_export(hybrid, "gemma3_text")
    message = str(refused.value)
    for trait in ("norm_unit_offset", "sandwich_norms", "embed_scale", "qk_norm", "no exact export"):
        assert trait in message
    assert "Families that can hold this model: ['qwen2', 'kvforge']" in message


def test_window_hybrid_with_the_gemma3_recipe_exports_as_stock_gemma3(tmp_path):
    """Exactly the models with every Gemma 3 trait export as Gemma 3: a window hybrid built with them
    (here one RoPE base for all layers: sliding layers get rope_theta, which Gemma 3 can express)."""
    config = tiny_form("gqa", **GEMMA3_TRAITS, tie_embeddings=True).replace(pattern=[{"window": 5}, {}])
    model = randomize_(CausalLM(config)).eval()
    assert plan_export(config).family.model_type == "gemma3_text"
    out = save_pretrained(config, model.state_dict(), tmp_path / "g3")
    ids = torch.randint(0, config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (load_hf(out)(ids).logits - model(ids)).abs().max().item() <= LOGITS_ATOL


def test_gemma2_training_losses_see_the_capped_logits(gemma):
    """The fused LM-head losses apply final_logit_softcapping per chunk: equal to the loss on forward()'s
    (capped) logits, for cross-entropy and for distillation from a soft-capped teacher."""
    _, pretrained = gemma("gemma2")
    model = kvforge_model(pretrained)
    ids = token_ids(2, 24)
    inputs, targets = ids[:, :-1], ids[:, 1:]
    with torch.no_grad():
        logits = model(inputs)
        expected_ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
        assert (model.loss(inputs, targets, chunk_size=7) - expected_ce).abs().item() <= 1e-5
        teacher_hidden = model.hidden_states(inputs)
        _, ce, kl = model.distillation_loss(
            inputs,
            targets,
            teacher_hidden,
            model.lm_head.weight,
            alpha=0.5,
            temperature=1.0,
            chunk_size=7,
            teacher_softcap=pretrained.config.final_logit_softcap,
        )
    assert (ce - expected_ce).abs().item() <= 1e-5
    assert kl.abs().item() <= 1e-6  # a model distilled from itself, both heads capped alike
