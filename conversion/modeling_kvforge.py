"""Hugging Face wrapper for kvforge-typed model directories (``"model_type": "kvforge"``).

kvforge copies this file verbatim into every model it exports in a form no stock transformers class
expresses (cross-layer K/V sharing, mixed MLA/GQA layers, per-layer windows of different sizes,
kvforge's MLA generalisations), so that

    AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)

loads it offline. It is deliberately a thin wrapper: the model is ``kvforge.arch.CausalLM`` itself,
so **kvforge must be installed** where the directory is loaded. The trade-off is one implementation
of every attention form (no second copy here to drift from the tested one); the price is that stock
servers (vLLM, SGLang) and machines without kvforge cannot load these directories - kvforge's export
command says so whenever it writes one. kvforge itself reads them natively, without running this file.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from kvforge.arch import CausalLM, KVCache, ModelConfig
from kvforge.arch.layers import RMSNorm, softcap
from kvforge.arch.rope import RotaryEmbedding


class KVForgeConfig(PretrainedConfig):
    """The kvforge ``ModelConfig`` (as a dict under ``kvforge``) plus the HF keys generation reads."""

    model_type = "kvforge"

    def __init__(self, kvforge: dict | None = None, **kwargs) -> None:
        self.kvforge = kvforge or {}
        super().__init__(**kwargs)


class KVForgeForCausalLM(PreTrainedModel, GenerationMixin):
    """``kvforge.arch.CausalLM`` under HF's loading, saving and ``generate``; parameter names are
    kvforge's (``model.layers.N.self_attn.q_proj.weight``, ``lm_head.weight``)."""

    config_class = KVForgeConfig
    base_model_prefix = "model"
    _no_split_modules: ClassVar[list[str]] = ["DecoderLayer"]
    _tied_weights_keys: ClassVar[dict[str, str]] = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: KVForgeConfig) -> None:
        super().__init__(config)
        causal_lm = CausalLM(ModelConfig.from_dict(config.kvforge))
        self.model, self.lm_head = causal_lm.model, causal_lm.lm_head
        self.post_init()

    # CausalLM's cache allocation only touches self.model, which this wrapper shares.
    new_cache = CausalLM.new_cache

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.model.embed_tokens

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.lm_head

    @torch.no_grad()
    def _init_weights(self, module: torch.nn.Module) -> None:
        std = self.model.config.init_std
        if isinstance(module, torch.nn.Linear):
            torch.nn.init.normal_(module.weight, std=std)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, torch.nn.Embedding):
            torch.nn.init.normal_(module.weight, std=std)
        elif isinstance(module, RMSNorm | RotaryEmbedding):
            module.reset_parameters()

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the cache is kvforge's own KVCache (ring buffers, shared entries, MLA latents)

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        past_key_values: KVCache | None = None,
        use_cache: bool | None = None,
        labels: torch.LongTensor | None = None,
        logits_to_keep: int = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("kvforge models take unpadded sequences: attention_mask must be all ones")
        if use_cache and past_key_values is None:
            past_key_values = self.new_cache(input_ids.shape[0], self.model.config.max_seq_len)
        hidden = self.model(input_ids, cache=past_key_values if use_cache else None)
        logits = softcap(
            self.lm_head(hidden[:, -logits_to_keep:] if logits_to_keep else hidden),
            self.model.config.final_logit_softcap,
        )
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=logits.shape[-1], **kwargs)
        return CausalLMOutputWithPast(
            loss=loss, logits=logits, past_key_values=past_key_values if use_cache else None
        )

    def prepare_inputs_for_generation(self, input_ids, past_key_values=None, attention_mask=None, **kwargs):
        """Feed only the tokens the kvforge cache has not seen yet."""
        if past_key_values is not None:
            input_ids = input_ids[:, past_key_values.length :]
        return {
            "input_ids": input_ids,
            "past_key_values": past_key_values,
            "attention_mask": attention_mask,
            "use_cache": kwargs.get("use_cache", True),
        }
