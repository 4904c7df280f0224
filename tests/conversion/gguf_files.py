"""Tiny GGUF files written in the test with the `gguf` package's own writer, the way llama.cpp's
convert_hf_to_gguf.py writes a Llama: GGUF tensor names, Q/K rows permuted into rotary pairs, a small
sentencepiece-style vocabulary embedded as metadata. Independent of kvforge's own GGUF code, so it is
a reference for it."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import torch
import transformers

from tests.conversion.hf_tiny import _MLA as _HF_TINY_MLA
from tests.conversion.hf_tiny import _SIZES
from tests.conversion.hf_tiny import VOCAB as FAMILY_VOCAB

VOCAB = (
    ["<unk>", "<s>", "</s>", "▁"]
    + [f"▁{c}" for c in "abcdefghijklmnopqrstuvwxyz"]
    + list("abcdefghijklmnopqrstuvwxyz.,!?'")
)
LLAMA_NAMES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}


def tiny_llama(tie: bool = False, seed: int = 0):
    """A random HF Llama small enough for Q8_0 blocks (rows of 64 and 128 values): GQA 4 heads / 2 K/V."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(VOCAB),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=128,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=tie,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=None,
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.RMSNorm | type(model.model.norm)):
                module.weight.add_(0.1 * torch.randn_like(module.weight))
    return model


def llama_cpp_permute(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute: rotate-half rows -> interleaved rotary pairs."""
    rows = weight.shape[0]
    return (
        weight.reshape(n_heads, 2, rows // n_heads // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def write_llama_gguf(
    path: Path,
    model,
    qtype: gguf.GGMLQuantizationType = gguf.GGMLQuantizationType.F32,
    architecture: str = "llama",
    extra_tensors: dict[str, tuple[np.ndarray, gguf.GGMLQuantizationType]] | None = None,
) -> Path:
    """``model`` (an HF LlamaForCausalLM) as llama.cpp writes it; matrices in ``qtype``, norms F32."""
    cfg = model.config
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_name("tiny llama")
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(VOCAB)
    writer.add_token_scores([0.0, 0.0, 0.0] + [-float(i) for i in range(len(VOCAB) - 3)])
    writer.add_token_types([2, 3, 3] + [1] * (len(VOCAB) - 3))
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_pad_token_id(2**32 - 1)  # llama.cpp's "none", as in real files (stories260K.gguf)
    writer.add_chat_template("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        values = tensor.float().numpy()
        if name.endswith("q_proj.weight"):
            values = llama_cpp_permute(values, cfg.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            values = llama_cpp_permute(values, cfg.num_key_value_heads)
        kind = qtype if values.ndim == 2 else gguf.GGMLQuantizationType.F32
        writer.add_tensor(gguf_name(name), gguf.quants.quantize(values, kind), raw_dtype=kind)
    for name, (values, kind) in (extra_tensors or {}).items():
        writer.add_tensor(name, values, raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def gguf_name(hf_name: str) -> str:
    if hf_name == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf_name == "lm_head.weight":
        return "output.weight"
    if hf_name == "model.norm.weight":
        return "output_norm.weight"
    _, _, layer, *leaf = hf_name.split(".")
    return f"blk.{layer}.{LLAMA_NAMES['.'.join(leaf[:-1])]}.{leaf[-1]}"


# Tiny random models of the families llama.cpp runs (GGUF export round trips, llama.cpp parity).
SIZES = _SIZES  # hf_tiny's sizes (vocab FAMILY_VOCAB, 3 layers, d 64); MLA sizes from it too
_MLA = {**_HF_TINY_MLA, "num_nextn_predict_layers": 0}  # its expert keys stay unused: every layer is dense
# Families llama.cpp runs, with the traits its graphs have (Gemma: default layer patterns, scalar = head_dim).
FAMILIES = {
    "llama": (transformers.LlamaConfig, dict(num_key_value_heads=2)),
    "llama-mqa-bias": (transformers.LlamaConfig, dict(num_key_value_heads=1, attention_bias=True)),
    "qwen2": (transformers.Qwen2Config, dict(num_key_value_heads=2, tie_word_embeddings=False)),
    "qwen3": (transformers.Qwen3Config, dict(num_key_value_heads=4, head_dim=16)),
    "gemma2": (
        transformers.Gemma2Config,
        dict(num_key_value_heads=2, head_dim=16, sliding_window=5, query_pre_attn_scalar=16),
    ),
    "deepseek_v3": (transformers.DeepseekV3Config, dict(_MLA, q_lora_rank=None)),
    "deepseek_v3-q-lora-tied": (
        transformers.DeepseekV3Config,
        dict(_MLA, q_lora_rank=24, tie_word_embeddings=True),
    ),
    "gemma3_text": (
        transformers.Gemma3TextConfig,
        dict(num_key_value_heads=2, head_dim=16, sliding_window=5, query_pre_attn_scalar=16),
    ),
}


def write_tokenizer(directory):
    """A byte-level BPE vocabulary of FAMILY_VOCAB tokens (llama.cpp's `gpt2` model: 95 single symbols and
    6 merges) with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    merges = [("t", "h"), ("th", "e"), ("a", "n"), ("an", "d"), ("i", "n"), ("o", "n")]
    symbols = list(bytes_to_unicode().values())[: FAMILY_VOCAB - len(merges)] + ["".join(m) for m in merges]
    vocab = {symbol: index for index, symbol in enumerate(symbols)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token='"', eos_token="#")
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    tokenizer.save_pretrained(directory)
