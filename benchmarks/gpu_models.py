"""The models benchmarks/gpu.py measures: the 1.1 B Llama shape of shared/GPU.md in every attention
form (the stock transformers twins come from :mod:`benchmarks.stock`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvforge.arch import CausalLM, ModelConfig
from kvforge.arch.presets import with_form

# shared/GPU.md: hidden 2048, 16 layers, 32 q / 8 kv heads (head_dim 64), FFN 8192, vocab 32000.
LLAMA_1B = dict(vocab_size=32000, d_model=2048, n_layers=16, n_heads=32, n_kv_heads=8, ffn_dim=8192)
# Its MLA baseline (DeepseekV3, dense MLP): 16 heads of 128 + 64 rotary dims, latent 512.
MLA_1B = dict(n_heads=16, head_dim=128, kv_lora_rank=512, rope_dims=64)
SMOKE = dict(vocab_size=256, d_model=64, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=128)
SMOKE_MLA = dict(n_heads=4, head_dim=16, kv_lora_rank=32, rope_dims=8)

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
            return with_form(base, "mla", kv_lora_rank=mla["kv_lora_rank"], rope_dims=mla["rope_dims"])
        base = self.base()
        return with_form(base, form, n_kv_heads=base.n_kv_heads, window=self.window)


def build_kvforge(config: ModelConfig, device: torch.device, dtype: torch.dtype) -> CausalLM:
    with torch.device(device):  # initialise on the device: a 1 B model on the CPU takes a while
        model = CausalLM(config)
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
