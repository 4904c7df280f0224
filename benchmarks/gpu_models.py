"""The models benchmarks/gpu.py measures: the 1.1 B Llama shape of shared/GPU.md in every attention
form, and the stock transformers models measured beside them (same sizes)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvforge.arch import CausalLM, ModelConfig
from kvforge.arch.forms import with_form

# shared/GPU.md: hidden 2048, 16 layers, 32 q / 8 kv heads (head_dim 64), FFN 8192, vocab 32000.
LLAMA_1B = dict(vocab_size=32000, d_model=2048, n_layers=16, n_heads=32, n_kv_heads=8, ffn_dim=8192)
# Its MLA baseline (DeepseekV3, dense MLP): 16 heads of 128 + 64 rotary dims, latent 512.
MLA_1B = dict(n_heads=16, head_dim=128, kv_lora_rank=512, rope_dim=64)
SMOKE = dict(vocab_size=256, d_model=64, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=128)
SMOKE_MLA = dict(n_heads=4, head_dim=16, kv_lora_rank=32, rope_dim=8)

FORMS = ("gqa", "mqa", "mla", "swa", "cla", "mix", "mha")
STOCK = {
    "gqa": "LlamaForCausalLM",
    "mha": "LlamaForCausalLM",
    "mqa": "LlamaForCausalLM",
    "mla": "DeepseekV3ForCausalLM",
}


@dataclass
class Shape:
    smoke: bool
    max_seq_len: int
    window: int

    def base(self, **overrides) -> ModelConfig:
        sizes = dict(SMOKE if self.smoke else LLAMA_1B)
        sizes.update(overrides)
        return ModelConfig(max_seq_len=self.max_seq_len, **sizes)

    def config(self, form: str) -> ModelConfig:
        if form == "mla":  # the stock DeepseekV3 proportions, not with_form's defaults for this width
            mla = SMOKE_MLA if self.smoke else MLA_1B
            base = self.base(n_heads=mla["n_heads"], head_dim=mla["head_dim"], n_kv_heads=None)
            return with_form(base, "mla", kv_lora_rank=mla["kv_lora_rank"], rope_dim=mla["rope_dim"])
        base = self.base()
        return with_form(base, form, n_kv_heads=base.n_kv_heads, window=self.window)


def build_kvforge(config: ModelConfig, device: torch.device, dtype: torch.dtype) -> CausalLM:
    with torch.device(device):  # initialise on the device: a 1 B model on the CPU takes a while
        model = CausalLM(config)
    return model.to(dtype)


def build_stock(config: ModelConfig, device: torch.device, dtype: torch.dtype, attn: str = "sdpa"):
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
        tie_word_embeddings=False,
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


def weight_bytes_read_per_step(model: torch.nn.Module) -> int:
    """Bytes of weights a decode step streams: all of them but the input embedding table, of which a
    step reads one row per sequence (the LM head, tied or not, is read in full)."""
    head = model.lm_head.weight
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)} - {id(head)}
    return sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in embeddings)


def flops_per_token(config: ModelConfig, non_embedding_params: int, seq_len: int) -> float:
    """shared/GPU.md's MFU convention: 6·N_non-embedding + 12·L·d·T (the same for every form)."""
    return 6 * non_embedding_params + 12 * config.n_layers * config.d_model * seq_len
