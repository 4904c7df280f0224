"""Tiny random checkpoints of every supported family, built and saved by transformers itself (fp32),
on the sizes and randomisation of benchmarks/tiny_hf.py (norm weights and biases included). Sliding
windows are 5 tokens, shorter than the test sequences, so windowed layers really drop keys.
"""

from __future__ import annotations

from pathlib import Path

import torch
import transformers

from benchmarks.tiny_hf import SIZES as _SIZES
from benchmarks.tiny_hf import VOCAB as VOCAB  # re-exported: the tests' token ids are below it
from benchmarks.tiny_hf import randomize_

WINDOW = 5
_MLA = dict(
    num_attention_heads=4,
    num_key_value_heads=4,
    kv_lora_rank=16,
    qk_rope_head_dim=8,
    qk_nope_head_dim=12,
    v_head_dim=16,
    first_k_dense_replace=3,
    n_routed_experts=4,
    num_experts_per_tok=2,
    n_group=1,
    topk_group=1,
)
_YARN = {
    "rope_type": "yarn",
    "rope_theta": 10000.0,
    "factor": 4.0,
    "original_max_position_embeddings": 16,
    "beta_fast": 32.0,
    "beta_slow": 1.0,
    "mscale": 1.0,
    "mscale_all_dim": 0.8,
}
_LLAMA3 = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}

# name -> (config class, overrides): one variant per behaviour the tables must get right.
VARIANTS: dict[str, tuple[type, dict]] = {
    "llama": (transformers.LlamaConfig, dict(num_key_value_heads=2, tie_word_embeddings=True)),
    "llama-bias-llama3-rope": (
        transformers.LlamaConfig,
        dict(num_key_value_heads=4, attention_bias=True, head_dim=16, rope_parameters=_LLAMA3),
    ),
    "mistral-window": (transformers.MistralConfig, dict(num_key_value_heads=2, sliding_window=WINDOW)),
    "qwen2-layer-types": (
        transformers.Qwen2Config,
        dict(
            num_key_value_heads=2,
            use_sliding_window=True,
            sliding_window=WINDOW,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        ),
    ),
    "qwen3-windows": (
        transformers.Qwen3Config,
        dict(
            num_key_value_heads=4,
            head_dim=16,
            use_sliding_window=True,
            sliding_window=WINDOW,
            max_window_layers=1,
        ),
    ),
    "deepseek_v2-q-lora": (transformers.DeepseekV2Config, dict(_MLA, q_lora_rank=24)),
    "deepseek_v2-yarn": (transformers.DeepseekV2Config, dict(_MLA, q_lora_rank=None, rope_parameters=_YARN)),
    "deepseek_v3": (transformers.DeepseekV3Config, dict(_MLA, q_lora_rank=None, num_nextn_predict_layers=0)),
    "deepseek_v3-q-lora-yarn": (
        transformers.DeepseekV3Config,
        dict(
            _MLA, q_lora_rank=24, rope_parameters=_YARN, tie_word_embeddings=True, num_nextn_predict_layers=0
        ),
    ),
    "deepseek_v3-rotate-half": (
        transformers.DeepseekV3Config,
        dict(_MLA, q_lora_rank=None, rope_interleave=False, attention_bias=True, num_nextn_predict_layers=0),
    ),
    # Gemma: GeGLU, 1 + w norms, sandwich norms, scaled embeddings, query_pre_attn_scalar != head_dim,
    # tied embeddings (Gemma's default); caps small enough that tanh bends these scores and logits.
    "gemma2": (
        transformers.Gemma2Config,
        dict(
            num_key_value_heads=2,
            head_dim=16,
            sliding_window=WINDOW,
            query_pre_attn_scalar=24,
            attn_logit_softcapping=1.5,
            final_logit_softcapping=2.0,
        ),
    ),
    "gemma3_text": (
        transformers.Gemma3TextConfig,
        dict(
            num_key_value_heads=2,
            head_dim=16,
            sliding_window=WINDOW,
            query_pre_attn_scalar=24,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            rope_parameters={
                "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1_000_000.0},
                "sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
            },
            final_logit_softcapping=4.0,
        ),
    ),
}


def hf_config(variant: str) -> transformers.PretrainedConfig:
    config_class, overrides = VARIANTS[variant]
    return config_class(**{**_SIZES, **overrides})


def build_hf_model(variant: str, seed: int = 0) -> transformers.PreTrainedModel:
    model = transformers.AutoModelForCausalLM.from_config(hf_config(variant), dtype=torch.float32)
    return randomize_(model, seed).eval()


def save_hf_model(variant: str, out: Path, seed: int = 0) -> Path:
    build_hf_model(variant, seed).save_pretrained(out)
    return out


def load_hf(path: Path, **kwargs) -> transformers.PreTrainedModel:
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kwargs).eval()
