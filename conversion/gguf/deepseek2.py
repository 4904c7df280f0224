"""Reading llama.cpp's ``deepseek2`` files back (MLA), which transformers' GGUF reader cannot: the
inverse of :data:`.architectures.DEEPSEEK2`, for dense models (``leading_dense_block_count`` =
``block_count``) such as the ones kvforge writes. The config is rebuilt as a stock ``DeepseekV3Config``
(interleaved rotary rows, which is what the file holds), the names come from gguf's own map, and
``attn_k_b`` (transposed) and ``attn_v_b`` are joined back into ``kv_b_proj``.
"""

from __future__ import annotations

import numpy as np
from gguf import GGUFReader

ARCH = "deepseek2"


def deepseek2_config(reader: GGUFReader, field) -> object:
    from transformers import DeepseekV3Config

    def key(name: str, default: object = ...) -> object:
        return field(reader, f"{ARCH}.{name}", default)

    layers, heads = int(key("block_count")), int(key("attention.head_count"))
    dense = int(key("leading_dense_block_count", 0))
    if dense < layers or key("expert_count", None):
        raise ValueError(
            f"{reader.data.filename}: a mixture-of-experts deepseek2 file (leading_dense_block_count={dense} of "
            f"{layers} layers); kvforge imports dense DeepSeek models only"
        )
    rope = int(key("rope.dimension_count"))
    tokens = field(reader, "tokenizer.ggml.tokens", None)
    q_lora = int(key("attention.q_lora_rank", 0)) or None
    return DeepseekV3Config(
        vocab_size=int(key("vocab_size", None) or len(tokens)),
        hidden_size=int(key("embedding_length")),
        intermediate_size=int(key("feed_forward_length")),
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=int(key("context_length")),
        rms_norm_eps=float(str(np.float32(key("attention.layer_norm_rms_epsilon")))),
        rope_theta=float(str(np.float32(key("rope.freq_base", 10000.0)))),
        kv_lora_rank=int(key("attention.kv_lora_rank")),
        q_lora_rank=q_lora,
        qk_rope_head_dim=rope,
        qk_nope_head_dim=int(key("attention.key_length_mla")) - rope,
        v_head_dim=int(key("attention.value_length_mla")),
        first_k_dense_replace=layers,
        num_nextn_predict_layers=0,
        rope_interleave=True,
        tie_word_embeddings=all(t.name != "output.weight" for t in reader.tensors),
        bos_token_id=field(reader, "tokenizer.ggml.bos_token_id", None),
        eos_token_id=field(reader, "tokenizer.ggml.eos_token_id", None),
        pad_token_id=None,
    )


def deepseek2_names(model, n_layers: int) -> dict[str, str]:
    """GGUF name -> HF name for every parameter of ``model`` (gguf's map, inverted); ``kv_b_proj`` is
    listed under ``attn_k_b`` and ``attn_v_b``, the two halves it is rebuilt from."""
    import gguf

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.DEEPSEEK2, n_layers)
    mapping = {}
    for hf_name in model.state_dict():
        base, _, suffix = hf_name.rpartition(".")
        if base.endswith("kv_b_proj"):
            for half in ("k_b_proj", "v_b_proj"):
                mapping[f"{names.get_name(base.replace('kv_b_proj', half))}.{suffix}"] = hf_name
            continue
        gguf_name = names.get_name(base)
        if gguf_name is not None:
            mapping[f"{gguf_name}.{suffix}"] = hf_name
    return mapping


def join_kv_b(k_b: np.ndarray, v_b: np.ndarray) -> np.ndarray:
    """``attn_k_b`` (heads, kv_lora_rank, nope) and ``attn_v_b`` (heads, v_dim, kv_lora_rank) -> kv_b_proj."""
    per_head = np.concatenate([k_b.transpose(0, 2, 1), v_b], axis=1)
    return per_head.reshape(-1, per_head.shape[-1])
