"""Grouped-Tied Attention (GTA; Zadouri, Strauss & Dao 2025, "Hardware-Efficient Attention for Fast
Decoding"): K and V of a group come from one tied state, and RoPE lives on one key shared by all heads.

Per token and layer the cache holds ``n_kv_heads`` tied states ``s_g = kv_proj(x)_g`` of ``head_dim``
values and one rotary key ``k_rope = rope(k_rope_proj(x))`` of ``head_dim / 2``:

- value of group g:  ``v_g = s_g``                                   (all ``head_dim`` dims)
- key of group g:    ``k_g = [s_g[:head_dim/2] | k_rope]``            (no-RoPE half from the tied state)
- query of head h:   ``q_h = [q_h[:head_dim/2] | rope(q_h[head_dim/2:])]``

so a layer caches ``n_kv_heads · head_dim + head_dim / 2`` values per token - about half of GQA's
``2 · n_kv_heads · head_dim`` for the same groups. The rotary half uses a rotary table of
``head_dim / 2`` dims (the ``gta`` table of the decoder). Parameter names are kvforge's (no stock
transformers class has GTA): ``q_proj, kv_proj, k_rope_proj, o_proj``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from . import attention_gqa
from .attention_gqa import GQAAttention
from .form_record import AttentionForm, Rotary
from .rope import apply_rope

if TYPE_CHECKING:  # annotations only: config.py imports the form registry, which imports this module
    from .config import LayerSpec, ModelConfig


class GTAAttention(GQAAttention):
    """GQA's forward (query, cached streams, keys/values from them, attention) with GTA's projections:
    ``kv_proj`` (tied states) and ``k_rope_proj`` (the shared rotary key) instead of ``k_proj``/``v_proj``."""

    def __init__(self, config: ModelConfig, spec: LayerSpec) -> None:
        super().__init__(config, spec)
        self.half = self.head_dim // 2
        self.q_norm = self.k_norm = None  # qk_norm (Qwen3's) is for gqa layers; like mla, gta has none

    def add_kv_projections(self, d_model: int, bias: bool) -> None:
        self.kv_proj = nn.Linear(d_model, self.n_kv_heads * self.head_dim, bias=bias)
        self.k_rope_proj = nn.Linear(d_model, self.head_dim // 2, bias=bias)

    def cache_features(self) -> list[tuple[int, ...]]:
        """Per position: the tied states ``(n_kv_heads, head_dim)`` and the shared rotary key ``(1, head_dim/2)``."""
        return [(self.n_kv_heads, self.head_dim), (1, self.half)]

    def query(self, x_btd: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        batch, seq, _ = x_btd.shape
        q_nope, q_rope = self.q_proj(x_btd).view(batch, seq, self.n_heads, self.head_dim).split(self.half, -1)
        return torch.cat((q_nope, apply_rope(q_rope, *rope)), dim=-1)

    def states(
        self, x_btd: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, ...]:
        """What one token caches: tied states and the rotary key."""
        batch, seq, _ = x_btd.shape
        tied = self.kv_proj(x_btd).view(batch, seq, self.n_kv_heads, self.head_dim)
        k_rope = apply_rope(self.k_rope_proj(x_btd).view(batch, seq, 1, self.half), *rope)
        return tied, k_rope

    def key_value(self, tied: torch.Tensor, k_rope: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-group keys ``[s[:half] | k_rope]`` and values ``s`` of cached positions."""
        k_rope = k_rope.expand(-1, -1, self.n_kv_heads, -1)
        return torch.cat((tied[..., : self.half], k_rope), dim=-1), tied


# ---------------------------------------------------------------------------------------------- facts
def kv_values(config: ModelConfig, spec: LayerSpec) -> int:
    """Tied K/V states + one shared rotary key of half a head."""
    return spec.n_kv_heads * config.head_dim + config.head_dim // 2


def parameters(config: ModelConfig, spec: LayerSpec) -> int:
    d, q_dim = config.d_model, config.n_heads * config.head_dim
    bias = config.attention_bias
    total = d * q_dim + q_dim * d + (q_dim if bias else 0) + (d if config.o_proj_bias else 0)
    if spec.kv_from is None:  # kv_proj (tied states) and k_rope_proj (half a head)
        state = spec.n_kv_heads * config.head_dim + config.head_dim // 2
        total += d * state + (state if bias else 0)
    return total


def projection_weights(config: ModelConfig, spec: LayerSpec) -> float:
    """q_proj + o_proj, plus the tied states and a shared rotary key of half a head."""
    d = config.d_model
    q_and_o = 2 * d * config.n_heads * config.head_dim
    return q_and_o + (0 if spec.kv_from is not None else d * (spec.n_kv_heads + 0.5) * config.head_dim)


def rotary(config: ModelConfig, spec: LayerSpec) -> Rotary:
    """The shared rotary key covers half of head_dim."""
    return Rotary("gta", config.head_dim // 2, config.rope_theta, config.rope_scaling)


def check_model(config: ModelConfig) -> None:
    if config.head_dim % 4:
        raise ValueError(
            f"ModelConfig.head_dim={config.head_dim}: must be a multiple of 4 for gta layers (half of it "
            "is rotary, and RoPE rotates pairs of dims)"
        )


GTA = AttentionForm(
    name="gta",
    block=GTAAttention,
    kv_values_per_token=kv_values,
    parameters=parameters,
    projection_weights=projection_weights,
    mixing_multiply_adds=attention_gqa.mixing_multiply_adds,
    activation_values=attention_gqa.activation_values,  # keys and values are materialised as in gqa
    rotary=rotary,
    label=lambda config, spec: f"gta-{spec.n_kv_heads}",
    layer_fields=("n_kv_heads",),
    check_layer=attention_gqa.check_kv_heads,
    check_model=check_model,
    traits=frozenset({"attn_logit_softcap", "query_pre_attn_scalar"}),
)
