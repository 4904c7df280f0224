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

from typing import TYPE_CHECKING

import torch
from torch import nn

from kvforge.kernels.attention import attention

from .cache import KVView, LayerCache
from .checks import check_positive, divisors
from .form_record import AttentionForm, Rotary
from .layers import RMSNorm, new_sinks
from .rope import apply_rope, yarn_mscale

if TYPE_CHECKING:  # annotations only: config.py imports the form registry, which imports this module
    from .config import LayerSpec, ModelConfig

# DeepSeek's latent and query norms use a fixed epsilon, not the model's rms_norm_eps (kvforge's latent norm
# reads ModelConfig.mla_latent_norm_eps, this by default).
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
            self.kv_a_layernorm = (
                RMSNorm(self.kv_lora_rank, config.mla_latent_norm_eps) if config.mla_latent_norm else None
            )
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


# ---------------------------------------------------------------------------------------------- facts
# MLA's facts serve GLA too (attention_gla.py): a gla layer's kv_b_proj reads one latent head.
def kv_values(config: ModelConfig, spec: LayerSpec) -> int:
    return config.kv_lora_rank + config.mla_rope_heads * config.qk_rope_head_dim


def _up_width(config: ModelConfig, spec: LayerSpec) -> int:
    """Latent values ``kv_b_proj`` reads per head: the whole latent, or a gla layer's latent head."""
    return config.kv_lora_rank // (spec.n_latent_heads or 1)


def parameters(config: ModelConfig, spec: LayerSpec) -> int:
    d, heads, rank = config.d_model, config.n_heads, config.kv_lora_rank
    bias = config.attention_bias
    q_out = heads * config.qk_head_dim
    if config.q_lora_rank is None:
        total = d * q_out
    else:
        total = d * config.q_lora_rank + (config.q_lora_rank if bias else 0) + config.q_lora_rank
        total += config.q_lora_rank * q_out
    latent = rank + config.mla_rope_heads * config.qk_rope_head_dim
    if spec.kv_from is None:
        total += d * latent + (latent if bias else 0) + (rank if config.mla_latent_norm else 0)
    total += _up_width(config, spec) * heads * (config.qk_nope_head_dim + config.v_head_dim)
    return total + heads * config.v_head_dim * d + (d if config.o_proj_bias else 0)


def projection_weights(config: ModelConfig, spec: LayerSpec) -> int:
    """Expanded form, as trained: q_proj (or q_a + q_b), kv_a_proj_with_mqa unless ``kv_from``, kv_b_proj
    (it expands every token's latent, shared or not) and o_proj."""
    d, heads = config.d_model, config.n_heads
    qk_dim = config.qk_nope_head_dim + config.qk_rope_head_dim
    if config.q_lora_rank is None:
        query = d * heads * qk_dim
    else:
        query = d * config.q_lora_rank + config.q_lora_rank * heads * qk_dim
    latent = 0 if spec.kv_from is not None else d * kv_values(config, spec)
    expand = _up_width(config, spec) * heads * (config.qk_nope_head_dim + config.v_head_dim)
    return query + latent + expand + heads * config.v_head_dim * d


def mixing_multiply_adds(config: ModelConfig, spec: LayerSpec, context: int) -> int:
    """Scores over d_qk = qk_nope_head_dim + qk_rope_head_dim and values of v_head_dim."""
    return config.n_heads * (config.qk_nope_head_dim + config.qk_rope_head_dim + config.v_head_dim) * context


def activation_values(config: ModelConfig, spec: LayerSpec) -> int:
    heads, qk, v = config.n_heads, config.qk_head_dim, config.v_head_dim
    latent = config.kv_lora_rank + config.mla_rope_heads * config.qk_rope_head_dim
    own_latent = 2 * latent + config.kv_lora_rank if spec.kv_from is None else 0
    padded = max(qk, v)  # the sdpa backend pads the narrower of Q/K and V to a common width
    return own_latent + heads * (2 * qk + 2 * padded + v + 1)


def rotary(config: ModelConfig, spec: LayerSpec) -> Rotary:
    """The decoupled rotary key: one table for both latent forms."""
    return Rotary(
        "mla", config.qk_rope_head_dim, config.mla_rope_theta or config.rope_theta, config.rope_scaling
    )


def check_model(config: ModelConfig) -> None:
    """The MLA sizes: required, positive, even rotary width; defaults for the nope and value widths."""
    missing = [name for name in ("kv_lora_rank", "qk_rope_head_dim") if getattr(config, name) is None]
    if missing:
        raise ValueError(
            f"ModelConfig.{missing[0]} is required when a layer uses attention='mla' "
            f"(missing: {', '.join(missing)}; DeepSeek-V3 uses kv_lora_rank=512, qk_rope_head_dim=64)"
        )
    if config.qk_nope_head_dim is None:
        config.qk_nope_head_dim = config.head_dim
    if config.v_head_dim is None:
        config.v_head_dim = config.head_dim
    check_positive(config, ("kv_lora_rank", "qk_rope_head_dim", "v_head_dim"))
    if config.q_lora_rank is not None:
        check_positive(config, ("q_lora_rank",))
        if config.mla_q_bias:
            raise ValueError(
                f"ModelConfig.mla_q_bias=True biases q_proj, which q_lora_rank={config.q_lora_rank} replaces by "
                "q_a_proj/q_b_proj (biased by attention_bias): allowed with q_lora_rank=None only"
            )
    if config.qk_nope_head_dim < 0:
        raise ValueError(f"ModelConfig.qk_nope_head_dim={config.qk_nope_head_dim}: must be >= 0")
    if config.qk_rope_head_dim % 2:
        raise ValueError(
            f"ModelConfig.qk_rope_head_dim={config.qk_rope_head_dim}: must be even (RoPE rotates pairs of dims)"
        )
    if config.n_heads % config.mla_rope_heads:
        raise ValueError(
            f"ModelConfig.mla_rope_heads={config.mla_rope_heads} must divide n_heads={config.n_heads} "
            f"(allowed: {divisors(config.n_heads)}; 1 = DeepSeek's rotary key shared by all heads)"
        )


MLA = AttentionForm(
    name="mla",
    block=MLAAttention,
    kv_values_per_token=kv_values,
    parameters=parameters,
    projection_weights=projection_weights,
    mixing_multiply_adds=mixing_multiply_adds,
    activation_values=activation_values,
    rotary=rotary,
    check_model=check_model,
)
