"""Multi-head, grouped-query and multi-query attention: one module, ``n_kv_heads`` = n_heads / g / 1.

Parameter names follow HF Llama/Qwen (``q_proj, k_proj, v_proj, o_proj``, optional ``q_norm``/``k_norm``
for Qwen3 and q/k/v biases for Qwen2). A layer with ``kv_from`` has no ``k_proj``/``v_proj``: it
attends over the K/V its source layer produced. ``sinks`` (gpt-oss's name) is one learned logit per
query head when the layer has attention sinks; a NoPE layer (``rope=False``) skips RoPE.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from kvforge.kernels.attention import attention

from .cache import KVView, LayerCache
from .checks import divisors
from .form_record import AttentionForm, Rotary
from .layers import RMSNorm, new_sinks
from .rope import apply_rope

if TYPE_CHECKING:  # annotations only: config.py imports the form registry, which imports this module
    from .config import LayerSpec, ModelConfig


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


# ---------------------------------------------------------------------------------------------- facts
def kv_values(config: ModelConfig, spec: LayerSpec) -> int:
    return 2 * spec.n_kv_heads * config.head_dim


def parameters(config: ModelConfig, spec: LayerSpec) -> int:
    d, q_dim, kv_dim = config.d_model, config.n_heads * config.head_dim, spec.n_kv_heads * config.head_dim
    bias = config.attention_bias
    total = d * q_dim + q_dim * d + (q_dim if bias else 0) + (d if config.o_proj_bias else 0)
    if spec.kv_from is None:
        total += 2 * (d * kv_dim + (kv_dim if bias else 0))
        total += config.head_dim if config.qk_norm else 0
    return total + (config.head_dim if config.qk_norm else 0)


def projection_weights(config: ModelConfig, spec: LayerSpec) -> int:
    """q_proj + o_proj, plus k_proj + v_proj unless the layer reads another layer's K/V."""
    d = config.d_model
    q_and_o = 2 * d * config.n_heads * config.head_dim
    k_and_v = 0 if spec.kv_from is not None else 2 * d * spec.n_kv_heads * config.head_dim
    return q_and_o + k_and_v


def mixing_multiply_adds(config: ModelConfig, spec: LayerSpec, context: int) -> int:
    """Scores and the weighted sum: ``d_qk + d_v`` per query head and visible key."""
    return config.n_heads * 2 * config.head_dim * context


def activation_values(config: ModelConfig, spec: LayerSpec) -> int:
    """Q, the output and K/V unless shared (keys and values are materialised), one log-sum-exp a head."""
    heads = config.n_heads
    q_dim, kv_dim = heads * config.head_dim, spec.n_kv_heads * config.head_dim
    own_kv = 2 * kv_dim if spec.kv_from is None else 0
    return 3 * q_dim + own_kv + heads


WINDOW_ROPE = "gqa_window"


def rotary(config: ModelConfig, spec: LayerSpec) -> Rotary:
    """Every head_dim rotates; Gemma 3's sliding layers rotate with their own base, unscaled."""
    if config.window_rope_theta is not None and spec.window is not None:
        return Rotary(WINDOW_ROPE, config.head_dim, config.window_rope_theta, None)
    return Rotary("gqa", config.head_dim, config.rope_theta, config.rope_scaling)


def label(config: ModelConfig, spec: LayerSpec) -> str:
    if spec.n_kv_heads == config.n_heads:
        return "mha"
    if spec.n_kv_heads == 1:
        return "mqa"
    return f"gqa-{spec.n_kv_heads}"


def check_kv_heads(config: ModelConfig, index: int, spec: LayerSpec) -> None:
    """``n_kv_heads`` defaults to the model's and must divide n_heads."""
    if spec.n_kv_heads is None:
        spec.n_kv_heads = config.n_kv_heads
    if spec.n_kv_heads <= 0 or config.n_heads % spec.n_kv_heads:
        raise ValueError(
            f"ModelConfig.layers[{index}].n_kv_heads={spec.n_kv_heads}: must divide n_heads={config.n_heads} "
            f"(allowed: {divisors(config.n_heads)})"
        )


def check_model(config: ModelConfig) -> None:
    if config.head_dim % 2:
        raise ValueError(
            f"ModelConfig.head_dim={config.head_dim}: must be even for gqa layers (RoPE rotates pairs of dims)"
        )


GQA = AttentionForm(
    name="gqa",
    block=GQAAttention,
    kv_values_per_token=kv_values,
    parameters=parameters,
    projection_weights=projection_weights,
    mixing_multiply_adds=mixing_multiply_adds,
    activation_values=activation_values,
    rotary=rotary,
    label=label,
    layer_fields=("n_kv_heads",),
    check_layer=check_kv_heads,
    check_model=check_model,
    traits=frozenset({"nope", "window_rope_theta", "attn_logit_softcap", "query_pre_attn_scalar"}),
)
