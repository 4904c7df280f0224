"""Multi-head latent attention (DeepSeek-V2/V3), with parameter names of HF DeepseekV3.

Each token caches one latent ``c`` (``kv_lora_rank``, after ``kv_a_layernorm``) and the rotary key
``k_pe`` (``qk_rope_head_dim``, one key shared by all heads) side by side in one row of
``kv_lora_rank + qk_rope_head_dim`` values. Keys and values of head ``h`` are ``W_UK_h c`` and
``W_UV_h c`` (the two halves of ``kv_b_proj``).

Two ways to compute the same attention:
- *expanded* (training, long prefill): materialise per-head keys/values from the latent;
- *absorbed* (decode): ``q·(W_UK c) = (W_UKᵀ q)·c`` and ``Σ p W_UV c = W_UV Σ p c``, so ``W_UK`` folds
  into the query and ``W_UV`` into the output and attention reads only the cached latent - one
  "KV head" of width ``kv_lora_rank + rope`` shared by all query heads (MQA over the latent).

kvforge generalisations for lossless conversion (not loadable by stock DeepseekV3):
``mla_rope_heads > 1`` gives each group of heads its own rotary key; ``mla_latent_norm=False``
drops ``kv_a_layernorm``; ``mla_q_bias`` biases ``q_proj`` (a Qwen2 query bias).
"""

from __future__ import annotations

import torch
from torch import nn

from kvforge.kernels.attention import attention

from .cache import KVView, LayerCache
from .config import LayerSpec, ModelConfig
from .layers import RMSNorm, new_sinks
from .rope import apply_rope, yarn_mscale

# DeepSeek's latent and query norms use a fixed epsilon, not the model's rms_norm_eps.
MLA_NORM_EPS = 1e-6
# With a cache, query blocks up to this long use the absorbed form (decode, speculative blocks).
ABSORB_MAX_QUERY_LEN = 16


class MLAAttention(nn.Module):
    def __init__(self, config: ModelConfig, spec: LayerSpec) -> None:
        super().__init__()
        self.n_heads = config.n_heads
        self.kv_lora_rank, self.rope_dim = config.kv_lora_rank, config.qk_rope_head_dim
        self.nope_dim, self.v_dim = config.qk_nope_head_dim, config.v_head_dim
        self.rope_heads = config.mla_rope_heads
        self.window, self.chunk = spec.window, spec.chunk
        self.owns_kv = spec.kv_from is None
        self.backend = config.attention_backend
        self.absorb = config.mla_absorb
        self.scale = config.qk_head_dim**-0.5
        scaling = config.rope_scaling
        if scaling is not None and scaling.type == "yarn" and scaling.mscale_all_dim:
            self.scale *= yarn_mscale(scaling.factor, scaling.mscale_all_dim) ** 2

        d_model, bias = config.d_model, config.attention_bias
        q_out = self.n_heads * (self.nope_dim + self.rope_dim)
        if config.q_lora_rank is None:
            self.q_proj = nn.Linear(d_model, q_out, bias=config.mla_q_bias)
        else:  # DeepSeek's low-rank query: q_b_proj(norm(q_a_proj(x)))
            self.q_proj = None
            self.q_a_proj = nn.Linear(d_model, config.q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(config.q_lora_rank, MLA_NORM_EPS)
            self.q_b_proj = nn.Linear(config.q_lora_rank, q_out, bias=False)
        if self.owns_kv:
            self.kv_a_proj_with_mqa = nn.Linear(
                d_model, self.kv_lora_rank + self.rope_heads * self.rope_dim, bias=bias
            )
            self.kv_a_layernorm = RMSNorm(self.kv_lora_rank, MLA_NORM_EPS) if config.mla_latent_norm else None
        self.kv_b_proj = nn.Linear(self.kv_lora_rank, self.n_heads * (self.nope_dim + self.v_dim), bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.v_dim, d_model, bias=config.o_proj_bias)
        # Sinks act on the softmax of each query head, the same in the expanded and absorbed forms.
        self.sinks = new_sinks(self.n_heads) if spec.sinks else None

    def cache_features(self) -> list[tuple[int, ...]]:
        """One row per position: the latent followed by the rotary key(s)."""
        return [(self.kv_lora_rank + self.rope_heads * self.rope_dim,)]

    def _query(self, x_btd: torch.Tensor) -> torch.Tensor:
        if self.q_proj is not None:
            return self.q_proj(x_btd)
        return self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x_btd)))

    def _latent(self, x_btd: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        batch, seq, _ = x_btd.shape
        latent, k_pe = self.kv_a_proj_with_mqa(x_btd).split(
            [self.kv_lora_rank, self.rope_heads * self.rope_dim], -1
        )
        if self.kv_a_layernorm is not None:
            latent = self.kv_a_layernorm(latent)
        k_pe = apply_rope(k_pe.view(batch, seq, self.rope_heads, self.rope_dim), cos, sin)
        return torch.cat((latent, k_pe.reshape(batch, seq, -1)), dim=-1)

    def use_absorbed(self, q_len: int, cached: bool) -> bool:
        if self.absorb == "auto":
            return cached and q_len <= ABSORB_MAX_QUERY_LEN
        return self.absorb == "always"

    def forward(
        self,
        x_btd: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        cache: LayerCache | None,
        start: int | torch.Tensor,
        shared: KVView | None,
        document_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, KVView]:
        batch, seq, _ = x_btd.shape
        cos, sin = rope
        q_bthd = self._query(x_btd).view(batch, seq, self.n_heads, self.nope_dim + self.rope_dim)
        q_nope, q_pe = q_bthd.split([self.nope_dim, self.rope_dim], dim=-1)
        q_pe = apply_rope(q_pe, cos, sin)
        if shared is not None:
            kv = shared
        else:
            latent = self._latent(x_btd, cos, sin)
            if cache is None:
                kv = KVView((latent,), causal=True, window=self.window, chunk=self.chunk)
            else:
                kv = cache.append((latent,), start, self.window)
        if self.use_absorbed(seq, cached=cache is not None):
            out = self.absorbed(q_nope, q_pe, kv, document_ids)
        else:
            out = self.expanded(q_nope, q_pe, kv, document_ids)
        return self.o_proj(out.reshape(batch, seq, -1)), kv

    def _up_project(self, c_kv: torch.Tensor) -> torch.Tensor:
        """``kv_b_proj`` of the latent rows: ``(batch, length, n_heads, nope + v)``."""
        return self.kv_b_proj(c_kv).view(*c_kv.shape[:2], self.n_heads, -1)

    def _latent_kv(self, latent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys ``[c | k_pe]`` and values ``c`` of the absorbed form, one KV head per rotary key."""
        if self.rope_heads == 1:  # the cache row is already [c | k_pe]: a single shared KV head, no copy
            return latent.unsqueeze(2), latent[..., : self.kv_lora_rank].unsqueeze(2)
        c_kv, k_pe = self._split_latent(latent)
        v = c_kv.unsqueeze(2).expand(-1, -1, self.rope_heads, -1)
        return torch.cat((v, k_pe), dim=-1), v

    def _split_latent(self, latent_bld: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch, length, _ = latent_bld.shape
        c_kv, k_pe = latent_bld.split([self.kv_lora_rank, self.rope_heads * self.rope_dim], dim=-1)
        return c_kv, k_pe.view(batch, length, self.rope_heads, self.rope_dim)

    def expand(self, latent_bld: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-head keys ``[W_UK c | k_pe]`` and values ``W_UV c`` of cached latent rows."""
        batch, length, _ = latent_bld.shape
        c_kv, k_pe = self._split_latent(latent_bld)
        k_nope, v = self._up_project(c_kv).split([self.nope_dim, self.v_dim], -1)
        group = self.n_heads // self.rope_heads
        k_pe = k_pe.unsqueeze(3).expand(batch, length, self.rope_heads, group, self.rope_dim)
        return torch.cat((k_nope, k_pe.reshape(batch, length, self.n_heads, self.rope_dim)), dim=-1), v

    def heads(self, x_btd: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]):
        """Per-head ``q, k, v`` of an uncached pass (the expanded form) and the scale."""
        batch, seq, _ = x_btd.shape
        q_bthd = self._query(x_btd).view(batch, seq, self.n_heads, self.nope_dim + self.rope_dim)
        q_nope, q_pe = q_bthd.split([self.nope_dim, self.rope_dim], dim=-1)
        q = torch.cat((q_nope, apply_rope(q_pe, *rope)), dim=-1)
        return (q, *self.expand(self._latent(x_btd, *rope))), self.scale

    def expanded(
        self, q_nope: torch.Tensor, q_pe: torch.Tensor, kv: KVView, document_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Materialise per-head keys and values from the latent, then ordinary attention."""
        k, v = self.expand(kv.streams[0])
        q = torch.cat((q_nope, q_pe), dim=-1)
        return attention(
            q,
            k,
            v,
            **kv.attention_kwargs(),
            scale=self.scale,
            backend=self.backend,
            document_ids=document_ids,
            sinks=self.sinks,
        )

    def absorbed(
        self, q_nope: torch.Tensor, q_pe: torch.Tensor, kv: KVView, document_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Attention over the cached latent itself: keys are never materialised."""
        latent = kv.streams[0]
        w_kv = self.kv_b_proj.weight.view(self.n_heads, self.nope_dim + self.v_dim, -1)
        w_uk, w_uv = w_kv[:, : self.nope_dim], w_kv[:, self.nope_dim :]
        q_latent = torch.einsum("bthd,hdr->bthr", q_nope, w_uk)
        q = torch.cat((q_latent, q_pe), dim=-1)
        k, v = self._latent_kv(latent)
        out_latent = attention(
            q,
            k,
            v,
            **kv.attention_kwargs(),
            scale=self.scale,
            backend=self.backend,
            document_ids=document_ids,
            sinks=self.sinks,
        )
        return torch.einsum("bthr,hvr->bthv", out_latent, w_uv)
