"""Checkpoints users convert (Llama-3.x llama3 rope scaling, Qwen2/2.5 biases, Qwen3 q/k norm), as tiny
random models transformers itself builds: converted by ``convert_checkpoint``, exported, reloaded by
transformers with logits equal to kvforge's, and a finite zero-shot loss on a fixed token text."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

from kvforge.conversion import load_pretrained
from kvforge.conversion.convert import convert_checkpoint
from kvforge.conversion.families import plan_export
from kvforge.conversion.transforms import to_mla
from tests.conversion.hf_tiny import _LLAMA3, _SIZES, VOCAB, load_hf, randomize_
from tests.conversion.stories_data import model_of

LOGIT_TOLERANCE = 1e-4  # fp32 transformers vs fp32 kvforge on the same exported weights
FAMILIES = {
    "llama3-rope": (
        transformers.LlamaConfig,
        dict(num_key_value_heads=8, head_dim=16, rope_parameters=_LLAMA3),
    ),
    "qwen2-biases": (transformers.Qwen2Config, dict(num_key_value_heads=8)),
    "qwen3-qk-norm": (transformers.Qwen3Config, dict(num_key_value_heads=8, head_dim=16)),
    "llama-no-bos": (transformers.LlamaConfig, dict(num_key_value_heads=8, bos_token_id=None)),
}
TEXT = torch.arange(48).remainder(VOCAB).mul(37).remainder(VOCAB).view(1, 48)  # a fixed token text


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    dirs = {}
    for name, (config_class, overrides) in FAMILIES.items():
        config = config_class(**{**_SIZES, **overrides})
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        randomize_(model).save_pretrained(root / name)
        dirs[name] = root / name
    return dirs


def _convert(source, out, transform, options):
    options = {**options, "progress": False}
    return convert_checkpoint(
        source, out, transform, options, device="cpu", calib_tokens=128, calib_seq_len=32
    )


def _check_export(out, stock_type):
    """transformers loads the export with the logits kvforge computes; the loss on TEXT is finite."""
    assert json.loads((out / "config.json").read_text())["model_type"] == stock_type
    converted = load_pretrained(out)
    with torch.no_grad():
        ours = model_of(converted.config, converted.state_dict)(TEXT)
        theirs = load_hf(out, trust_remote_code=stock_type == "kvforge")(TEXT).logits
    assert (ours - theirs).abs().max().item() <= LOGIT_TOLERANCE
    loss = torch.nn.functional.cross_entropy(ours[0, :-1], TEXT[0, 1:]).item()
    assert torch.isfinite(torch.tensor(loss))
    print(f"{out.name}: zero-shot loss on the fixed text {loss:.4f}")
    return converted


@pytest.mark.parametrize(
    ("family", "stock_type"),
    [
        ("llama3-rope", "llama"),
        ("qwen2-biases", "qwen2"),
        ("qwen3-qk-norm", "qwen3"),
        ("llama-no-bos", "llama"),
    ],
)
def test_aligned_gqa_converts_and_exports_to_the_stock_class(family_dirs, tmp_path, family, stock_type):
    _convert(family_dirs[family], tmp_path / family, "gqa", {"n_kv_heads": 2})
    assert _check_export(tmp_path / family, stock_type).config.n_kv_heads == 2


def test_llama3_rope_scaling_goes_through_mla_to_a_stock_deepseek_v3(family_dirs, tmp_path):
    out = tmp_path / "mla"
    _convert(family_dirs["llama3-rope"], out, "mla", {"kv_lora_rank": 32, "rope_dims": 8})
    hf = json.loads((out / "config.json").read_text())
    assert hf["rope_parameters"]["rope_type"] == "llama3"  # transformers builds the same scaled frequencies
    converted = _check_export(out, "deepseek_v3")
    assert converted.config.rope_scaling is not None and converted.config.rope_scaling.type == "llama3"


def test_self_calibration_without_bos_starts_from_eos(family_dirs):
    from kvforge.conversion.transforms import sample_calibration_ids

    source = load_pretrained(family_dirs["llama-no-bos"])
    assert source.config.bos_token_id is None
    ids = sample_calibration_ids(source.config, source.state_dict, 64, 16)
    assert ids.shape == (4, 16) and int(ids.max()) < VOCAB


def test_qwen2_biases_go_through_mla_exactly_at_the_lossless_bound(family_dirs):
    """Every pair kept, full rank, per-K/V-head rotary keys: the biases cost nothing (key bias in
    kv_a_proj's rotary rows, value bias in o_proj's bias, query bias in q_proj's)."""
    source = load_pretrained(family_dirs["qwen2-biases"])
    config, state_dict = to_mla(
        source.config, source.state_dict, kv_lora_rank=64, rope_dims=8, layout="kvforge"
    )
    assert config.attention_bias and config.o_proj_bias and config.mla_q_bias
    with torch.no_grad():
        expected = model_of(source.config, source.state_dict)(TEXT)
        got = model_of(config, state_dict)(TEXT)
    assert (got - expected).abs().max().item() <= LOGIT_TOLERANCE


def test_qwen2_biases_go_through_mla_to_a_kvforge_typed_export(family_dirs, tmp_path):
    """DeepseekV3 holds the key bias (kv_a_proj) and the value bias (o_proj) but has no q_proj bias:
    the export is kvforge-typed, and says why."""
    out = tmp_path / "qwen2-mla"
    _convert(family_dirs["qwen2-biases"], out, "mla", {"kv_lora_rank": 32, "rope_dims": 4})
    converted = _check_export(out, "kvforge")
    assert converted.config.mla_q_bias and converted.config.mla_latent_norm
    assert "q_proj has no bias" in plan_export(converted.config).notes[0]


def test_qwen3_qk_norm_goes_through_mla_to_a_stock_deepseek_v3(family_dirs, tmp_path):
    """The norms become linear stand-ins (approximate): nothing left that DeepseekV3 lacks."""
    out = tmp_path / "qwen3-mla"
    _convert(family_dirs["qwen3-qk-norm"], out, "mla", {"kv_lora_rank": 32, "rope_dims": 8})
    assert not _check_export(out, "deepseek_v3").config.qk_norm


@pytest.mark.parametrize(
    ("family", "transform", "options"),
    [
        ("qwen2-biases", "mla", {"kv_lora_rank": 32, "rope_dims": 4}),
        ("qwen3-qk-norm", "gqa", {"n_kv_heads": 2}),
        ("qwen3-qk-norm", "mla", {"kv_lora_rank": 32, "rope_dims": 8}),
    ],
)
def test_streamed_conversion_of_the_family_equals_the_in_memory_transform(
    family_dirs, tmp_path, family, transform, options
):
    """convert_checkpoint (one layer at a time from disk) computes what the in-memory transform does."""
    from kvforge.conversion.transforms import TRANSFORMS

    source = load_pretrained(family_dirs[family])
    ids = torch.randint(0, VOCAB, (4, 32), generator=torch.Generator().manual_seed(3))
    config, expected = TRANSFORMS[transform](source.config, source.state_dict, ids, **options)
    out, _, streamed_config = convert_checkpoint(
        family_dirs[family], tmp_path / family, transform, options, device="cpu", calibration=ids
    )
    assert streamed_config == config
    converted = load_pretrained(out).state_dict
    assert set(converted) == set(expected)
    for key, tensor in expected.items():
        assert (converted[key].double() - tensor.double()).abs().max().item() <= 1e-5, key
