"""The decoder: embeddings, a stack of pre-norm layers whose attention form comes from their
``LayerSpec``, a final RMSNorm and the LM head. Parameter names are HF Llama/DeepSeek names
(``model.layers.3.self_attn.q_proj.weight``, ``lm_head.weight``) so import/export is a rename at most."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from kvforge.kernels.cross_entropy import IGNORE_INDEX, linear_cross_entropy
from kvforge.kernels.distillation import linear_distillation_loss
from kvforge.kernels.documents import document_positions

from .cache import KVCache, KVView, LayerCache
from .config import LayerSpec, ModelConfig
from .forms import form_of
from .layers import RMSNorm, SwiGLU, softcap
from .rope import RotaryEmbedding


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, index: int) -> None:
        super().__init__()
        self.index = index
        self.spec: LayerSpec = config.layers[index]
        # Llama names: post_attention_layernorm is the norm *before* the MLP. Gemma's sandwich adds a norm
        # on each sub-block's output (Gemma calls the attention one post_attention_layernorm and the
        # pre-MLP one pre_feedforward_layernorm; its family table renames them).
        d, eps, offset = config.d_model, config.norm_eps, config.norm_unit_offset
        self.input_layernorm = RMSNorm(d, eps, offset)
        self.self_attn = form_of(self.spec).block(config, self.spec)
        self.post_attention_layernorm = RMSNorm(d, eps, offset)
        self.mlp = SwiGLU(d, config.ffn_dim, config.mlp_activation)
        self.attention_output_layernorm = RMSNorm(d, eps, offset) if config.sandwich_norms else None
        self.post_feedforward_layernorm = RMSNorm(d, eps, offset) if config.sandwich_norms else None

    def forward(
        self,
        x_btd: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        cache: LayerCache | None,
        start: int | torch.Tensor,
        shared: KVView | None,
        document_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, KVView]:
        attn_out, kv = self.self_attn(self.input_layernorm(x_btd), rope, cache, start, shared, document_ids)
        if self.attention_output_layernorm is not None:
            attn_out = self.attention_output_layernorm(attn_out)
        h = x_btd + attn_out
        mlp_out = self.mlp(self.post_attention_layernorm(h))
        if self.post_feedforward_layernorm is not None:
            mlp_out = self.post_feedforward_layernorm(mlp_out)
        return h + mlp_out, kv


def embedding_multiplier(d_model: int, dtype: torch.dtype) -> float:
    """Gemma's embedding scale: sqrt(d_model) as float32 rounded to the weights' dtype (transformers keeps
    it as a float32 buffer cast to the weight dtype; in bf16 sqrt(3072) = 55.4256 becomes 55.5)."""
    return float(torch.tensor(d_model**0.5, dtype=torch.float32).to(dtype))


def rotary_key(config: ModelConfig, spec: LayerSpec) -> str | None:
    """Which rotary table of :func:`rotary_embeddings` a layer reads (None: its form rotates nothing)."""
    rotary = form_of(spec).rotary(config, spec)
    return None if rotary is None else rotary.name


def rotary_embeddings(config: ModelConfig) -> dict[str, RotaryEmbedding]:
    """One rotary table per distinct table the layers' forms ask for (by the width they rotate)."""
    tables = {}
    for spec in config.layers:
        rotary = form_of(spec).rotary(config, spec)
        if rotary is not None and rotary.name not in tables:
            tables[rotary.name] = RotaryEmbedding(rotary.dim, rotary.theta, rotary.scaling)
    return tables


class Decoder(nn.Module):
    """HF's ``model.``: embeddings, layers, final norm, and the rotary tables each form needs."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.d_model)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.n_layers))
        self.norm = RMSNorm(config.d_model, config.norm_eps, config.norm_unit_offset)
        self.rotary = nn.ModuleDict(rotary_embeddings(config))
        # Layers whose K/V another layer reads: their view is kept until the forward pass ends.
        self.kv_sources = {spec.kv_from for spec in config.layers if spec.kv_from is not None}
        self.gradient_checkpointing = False

    def forward(
        self,
        input_ids: torch.Tensor,
        cache: KVCache | None = None,
        positions: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        seq = input_ids.shape[1]
        start: int | torch.Tensor = 0
        if document_ids is not None:
            if cache is not None or positions is not None:
                raise ValueError(
                    "document_ids (packed documents, positions restart per document) cannot be combined "
                    "with a cache or explicit positions"
                )
            positions = document_positions(document_ids)
        if cache is not None:
            cache.check_room(seq)
            # A static cache decodes one token at its device-side position: nothing here reads a host
            # number that changes per token, so the step can be replayed from a CUDA graph.
            start = cache.position if cache.static and seq == 1 else cache.length
        if positions is None:
            positions = torch.arange(seq, device=input_ids.device) + start
        h = self.embed_tokens(input_ids)
        if self.config.embed_scale:
            h = h * embedding_multiplier(self.config.d_model, h.dtype)
        ropes = {form: rotary(positions, h.dtype) for form, rotary in self.rotary.items()}
        views: dict[int, KVView] = {}
        for layer in self.layers:
            spec = layer.spec
            shared = views[spec.kv_from] if spec.kv_from is not None else None
            entry = cache[layer.index] if cache is not None else None
            args = (h, ropes.get(rotary_key(self.config, spec)), entry, start, shared, document_ids)
            if self.gradient_checkpointing and self.training:
                h, view = checkpoint(layer, *args, use_reentrant=False)
            else:
                h, view = layer(*args)
            if layer.index in self.kv_sources:
                views[layer.index] = view
        if cache is not None:
            cache.advance(seq)
        return self.norm(h)


class CausalLM(nn.Module):
    """Decoder + LM head. ``forward(input_ids, cache=None, positions=None) -> logits``."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = Decoder(config)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        if not any(p.is_meta for p in self.parameters()):
            self.init_weights()

    # ------------------------------------------------------------------ construction
    @torch.no_grad()
    def init_weights(self) -> None:
        """GPT-2/Llama-style init: N(0, init_std), residual output projections scaled by
        1/sqrt(2·n_layers), norms to one, biases to zero. Also re-derives RoPE tables (meta init)."""
        std = self.config.init_std
        residual_std = std / math.sqrt(2 * self.config.n_layers)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                is_residual = name.endswith(("o_proj", "down_proj"))
                nn.init.normal_(module.weight, mean=0.0, std=residual_std if is_residual else std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            elif isinstance(module, RMSNorm | RotaryEmbedding):
                module.reset_parameters()
            if isinstance(getattr(module, "sinks", None), nn.Parameter):
                nn.init.zeros_(module.sinks)
        for layer in self.model.layers:  # blocks with parameters of their own (feature maps, gates, convs)
            reset = getattr(layer.self_attn, "reset_parameters", None)
            if reset is not None:
                reset()

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        total = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            total -= self.model.embed_tokens.weight.numel()
        return total

    # ------------------------------------------------------------------ forward / cache
    def forward(
        self,
        input_ids: torch.Tensor,
        cache: KVCache | None = None,
        positions: torch.Tensor | None = None,
        logits_to_keep: int = 0,
        document_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits ``(batch, seq, vocab)``; ``logits_to_keep=n`` computes only the last ``n`` positions.
        ``document_ids`` ``(batch, seq)``: a packed block - positions restart at each document and no
        token attends across a boundary (see :mod:`kvforge.kernels.documents`)."""
        hidden = self.model(input_ids, cache=cache, positions=positions, document_ids=document_ids)
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        return self.logits(hidden)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The LM head on final hidden states, soft-capped when the model caps its logits (Gemma 2)."""
        return softcap(self.lm_head(hidden), self.config.final_logit_softcap)

    def loss(
        self,
        input_ids: torch.Tensor,
        targets: torch.Tensor,
        positions: torch.Tensor | None = None,
        ignore_index: int = IGNORE_INDEX,
        chunk_size: int = 1024,
        document_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Mean next-token cross-entropy (``targets`` aligned with ``input_ids``), through the fused
        chunked head + loss: the full logits tensor is never materialised. With ``document_ids`` the
        block is packed documents (see :meth:`forward`); a document's last target (the next
        document's first token) is the caller's to keep or set to ``ignore_index``."""
        hidden = self.model(input_ids, positions=positions, document_ids=document_ids)
        return linear_cross_entropy(
            hidden,
            self.lm_head.weight,
            targets,
            ignore_index=ignore_index,
            chunk_size=chunk_size,
            softcap=self.config.final_logit_softcap,
        )

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The final-norm hidden states ``(batch, seq, d_model)`` the LM head reads (no cache)."""
        return self.model(input_ids, positions=positions, document_ids=document_ids)

    def distillation_loss(
        self,
        input_ids: torch.Tensor,
        targets: torch.Tensor,
        teacher_hidden: torch.Tensor,
        teacher_weight: torch.Tensor,
        *,
        alpha: float,
        temperature: float,
        reverse: bool = False,
        chunk_size: int = 1024,
        document_ids: torch.Tensor | None = None,
        teacher_softcap: float | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(loss, ce, kl)`` of distillation from a teacher's final hidden states and LM head weight, both
        heads applied one chunk of tokens at a time (:mod:`kvforge.kernels.distillation`): the full
        logits of neither model are materialised. Each head is soft-capped as its model caps it: this
        model's ``final_logit_softcap``, the teacher's ``teacher_softcap`` (its config's)."""
        hidden = self.model(input_ids, document_ids=document_ids)
        return linear_distillation_loss(
            hidden,
            self.lm_head.weight,
            teacher_hidden,
            teacher_weight,
            targets,
            alpha=alpha,
            temperature=temperature,
            reverse=reverse,
            chunk_size=chunk_size,
            softcap=self.config.final_logit_softcap,
            teacher_softcap=teacher_softcap,
        )

    def new_cache(
        self,
        batch: int,
        max_len: int,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        static: bool = False,
    ) -> KVCache:
        """Preallocate a cache for ``batch`` sequences of up to ``max_len`` tokens. ``static=True``
        keeps the position on the device too, for fixed-shape (CUDA-graph) decode steps."""
        if max_len <= 0 or batch <= 0:
            raise ValueError(f"new_cache: batch={batch} and max_len={max_len} must be positive")
        reference = self.model.embed_tokens.weight
        dtype = dtype or reference.dtype
        device = device or reference.device
        entries: list[LayerCache] = []
        owners: list[int] = []
        for layer in self.model.layers:
            spec = layer.spec
            if spec.kv_from is not None:
                entries.append(entries[spec.kv_from])
                owners.append(spec.kv_from)
                continue
            entries.append(form_of(spec).new_cache(layer.self_attn, spec, batch, max_len, dtype, device))
            owners.append(layer.index)
        position = torch.zeros(1, dtype=torch.long, device=device) if static else None
        return KVCache(entries, owners, max_len, position)
