"""Multi-head, grouped-query and multi-query attention: one module, ``n_kv_heads`` = n_heads / g / 1.

Parameter names follow HF Llama/Qwen (``q_proj, k_proj, v_proj, o_proj``, optional ``q_norm``/``k_norm``
for Qwen3 and q/k/v biases for Qwen2). A layer with ``kv_from`` has no ``k_proj``/``v_proj``: it
attends over the K/V its source layer produced. ``sinks`` (gpt-oss's name) is one learned logit per
query head when the layer has attention sinks; a NoPE layer (``rope=False``) skips RoPE.
"""

from __future__ import annotations

import torch
from torch import nn

from kvforge.kernels.attention import attention

from .cache import KVView, LayerCache
from .config import LayerSpec, ModelConfig
from .layers import RMSNorm, new_sinks
from .rope import apply_rope


class GQAAttention(nn.Module):
    def __init__(self, config: ModelConfig, spec: LayerSpec) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, spec.n_kv_heads, config.head_dim
        self.window, self.chunk, self.rope = spec.window, spec.chunk, spec.rope
        self.owns_kv = spec.kv_from is None
        # Gemma scales scores by query_pre_attn_scalar^-1/2, which need not be head_dim's.
        self.scale = (config.query_pre_attn_scalar or self.head_dim) ** -0.5
        self.softcap = config.attn_logit_softcap
        self.backend = config.attention_backend
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.d_model, self.n_heads * self.head_dim, bias=bias)
        if self.owns_kv:
            self.add_kv_projections(config.d_model, bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, config.d_model, bias=config.o_proj_bias)
        offset = config.norm_unit_offset
        self.q_norm = RMSNorm(self.head_dim, config.norm_eps, offset) if config.qk_norm else None
        self.k_norm = (
            RMSNorm(self.head_dim, config.norm_eps, offset) if config.qk_norm and self.owns_kv else None
        )
        self.sinks = new_sinks(self.n_heads) if spec.sinks else None

    def add_kv_projections(self, d_model: int, bias: bool) -> None:
        self.k_proj = nn.Linear(d_model, self.n_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(d_model, self.n_kv_heads * self.head_dim, bias=bias)

    def cache_features(self) -> list[tuple[int, ...]]:
        """Per-position shapes this layer caches: K and V, ``(n_kv_heads, head_dim)`` each."""
        return [(self.n_kv_heads, self.head_dim), (self.n_kv_heads, self.head_dim)]

    def query(self, x_btd: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        batch, seq, _ = x_btd.shape
        q_bthd = self.q_proj(x_btd).view(batch, seq, self.n_heads, self.head_dim)
        if self.q_norm is not None:
            q_bthd = self.q_norm(q_bthd)
        return apply_rope(q_bthd, *rope) if self.rope else q_bthd

    def states(
        self, x_btd: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, ...]:
        """What the new tokens add to the cache (here K and V themselves)."""
        batch, seq, _ = x_btd.shape
        k_bthd = self.k_proj(x_btd).view(batch, seq, self.n_kv_heads, self.head_dim)
        v_bthd = self.v_proj(x_btd).view(batch, seq, self.n_kv_heads, self.head_dim)
        if self.k_norm is not None:
            k_bthd = self.k_norm(k_bthd)
        return (apply_rope(k_bthd, *rope) if self.rope else k_bthd), v_bthd

    def key_value(self, *streams: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of cached positions from the cached streams (here they are K and V)."""
        return streams

    def heads(self, x_btd: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]):
        """Per-head ``q, k, v`` of an uncached pass (what calibration fits against) and the scale."""
        return (self.query(x_btd, rope), *self.key_value(*self.states(x_btd, rope))), self.scale

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
        q_bthd = self.query(x_btd, rope)
        if shared is not None:
            kv = shared
        else:
            new = self.states(x_btd, rope)
            if cache is None:
                kv = KVView(new, causal=True, window=self.window, chunk=self.chunk)
            else:
                kv = cache.append(new, start, self.window)
        k_all, v_all = self.key_value(*kv.streams)
        out = attention(
            q_bthd,
            k_all,
            v_all,
            **kv.attention_kwargs(),
            scale=self.scale,
            backend=self.backend,
            document_ids=document_ids,
            sinks=self.sinks,
            softcap=self.softcap,
        )
        return self.o_proj(out.reshape(batch, seq, -1)), kv
