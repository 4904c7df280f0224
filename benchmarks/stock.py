"""Stock transformers models with the sizes of a kvforge config (the same parameter names, so
``load_state_dict(kvforge_model.state_dict())`` gives both the same weights): the baselines that the
benchmarks measure in the same run."""

from __future__ import annotations

import torch

from kvforge.arch import ModelConfig


def build_stock(
    config: ModelConfig,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    attn: str = "sdpa",
):
    """The transformers model with the same sizes (Llama for GQA/MHA/MQA, DeepseekV3 for MLA)."""
    import transformers

    common = dict(
        vocab_size=config.vocab_size,
        hidden_size=config.d_model,
        intermediate_size=config.ffn_dim,
        num_hidden_layers=config.n_layers,
        num_attention_heads=config.n_heads,
        max_position_embeddings=config.max_seq_len,
        rms_norm_eps=config.norm_eps,
        rope_theta=config.rope_theta,
        tie_word_embeddings=config.tie_embeddings,
    )
    if config.layers[0].attention == "mla":
        hf_config = transformers.DeepseekV3Config(
            **common,
            num_key_value_heads=config.n_heads,
            kv_lora_rank=config.kv_lora_rank,
            q_lora_rank=None,
            qk_rope_head_dim=config.qk_rope_head_dim,
            qk_nope_head_dim=config.qk_nope_head_dim,
            v_head_dim=config.v_head_dim,
            first_k_dense_replace=config.n_layers,  # every layer a dense MLP, as kvforge's
            rope_interleave=False,
        )
        model_class = transformers.DeepseekV3ForCausalLM
    else:
        hf_config = transformers.LlamaConfig(
            **common, num_key_value_heads=config.layers[0].n_kv_heads, head_dim=config.head_dim
        )
        model_class = transformers.LlamaForCausalLM
    hf_config._attn_implementation = attn
    with torch.device(device):
        model = model_class(hf_config)
    return model.to(dtype)
