"""Grouped-Latent Attention (GLA; Zadouri, Strauss & Dao 2025, "Hardware-Efficient Attention for Fast
Decoding"): MLA's latent split into ``n_latent_heads`` latent heads, each read by its own group of
query heads.

The cache row is MLA's - ``kv_lora_rank`` latent values followed by one rotary key - but the latent
is ``n_latent_heads`` heads of ``r = kv_lora_rank / n_latent_heads`` values, and query head ``h``
(of group ``g = h // (n_heads / n_latent_heads)``) reads only latent head ``g``: its key is
``[W_UK_h c_g | k_pe]`` and its value ``W_UV_h c_g``. So ``kv_b_proj`` maps ``r`` values (not the
whole latent) to each head, and a tensor-parallel rank can hold its own latent head instead of a
copy of the whole latent. Absorbed decode is MLA's with ``n_latent_heads`` KV heads: ``W_UK_h``
folds into query ``h``, attention runs over ``[c_g | k_pe]`` (GQA over latent heads), ``W_UV_h``
folds into the output. Each latent head has its own RMSNorm (``kv_a_layernorm``, grouped).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from . import attention_mla
from .attention_mla import MLAAttention
from .checks import divisors
from .form_record import AttentionForm
from .layers import RMSNorm

if TYPE_CHECKING:  # annotations only: config.py imports the form registry, which imports this module
    from .config import LayerSpec, ModelConfig


class GroupedRMSNorm(RMSNorm):
    """RMSNorm over each of ``groups`` equal slices of the last dim (one weight per value)."""

    def __init__(self, dim: int, groups: int, eps: float) -> None:
        super().__init__(dim, eps)
        self.groups = groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        grouped = x.float().unflatten(-1, (self.groups, -1))
        normed = F.rms_norm(grouped, (grouped.shape[-1],), eps=self.eps).flatten(-2)
        return self.weight * normed.to(x.dtype)


class GLAAttention(MLAAttention):
    def __init__(self, config: ModelConfig, spec: LayerSpec) -> None:
        super().__init__(config, spec)
        self.n_latent_heads = spec.n_latent_heads
        self.latent_head_dim = self.kv_lora_rank // self.n_latent_heads
        out = self.n_heads * (self.nope_dim + self.v_dim)
        self.kv_b_proj = nn.Linear(self.latent_head_dim, out, bias=False)
        if self.owns_kv and config.mla_latent_norm:
            self.kv_a_layernorm = GroupedRMSNorm(
                self.kv_lora_rank, self.n_latent_heads, config.mla_latent_norm_eps
            )

    def _up_project(self, c_kv: torch.Tensor) -> torch.Tensor:
        batch, length, _ = c_kv.shape
        c_blgr = c_kv.view(batch, length, self.n_latent_heads, self.latent_head_dim)
        w_gjer = self.kv_b_proj.weight.view(
            self.n_latent_heads, -1, self.nope_dim + self.v_dim, self.latent_head_dim
        )
        return torch.einsum("blgr,gjer->blgje", c_blgr, w_gjer).reshape(batch, length, self.n_heads, -1)

    def _latent_kv(self, latent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys ``[c_g | k_pe]`` and values ``c_g``: one KV head per latent head."""
        c_kv, k_pe = self._split_latent(latent)
        c_blgr = c_kv.unflatten(-1, (self.n_latent_heads, self.latent_head_dim))
        k_pe = k_pe.expand(-1, -1, self.n_latent_heads, -1)
        return torch.cat((c_blgr, k_pe), dim=-1), c_blgr


# ---------------------------------------------------------------------------------------------- facts
def check_model(config: ModelConfig) -> None:
    """MLA's sizes, then each gla layer's latent heads (they split n_heads and kv_lora_rank)."""
    attention_mla.check_model(config)
    for index, spec in enumerate(config.layers):
        if spec.attention != "gla" or spec.kv_from is not None:
            continue
        where = f"ModelConfig.layers[{index}].n_latent_heads={spec.n_latent_heads}"
        heads = spec.n_latent_heads
        if not isinstance(heads, int) or heads <= 0 or config.n_heads % heads or config.kv_lora_rank % heads:
            raise ValueError(
                f"{where}: a gla layer needs a number of latent heads that divides n_heads={config.n_heads} "
                f"and kv_lora_rank={config.kv_lora_rank} (allowed: "
                f"{[d for d in divisors(config.n_heads) if config.kv_lora_rank % d == 0]})"
            )
        if config.mla_rope_heads != 1:
            raise ValueError(
                f"ModelConfig.mla_rope_heads={config.mla_rope_heads}: gla layers (layer {index}) share one "
                "rotary key across latent heads (allowed: 1)"
            )


GLA = AttentionForm(
    name="gla",
    block=GLAAttention,
    kv_values_per_token=attention_mla.kv_values,  # MLA's row: the latent (in latent heads) + one rotary key
    parameters=attention_mla.parameters,
    projection_weights=attention_mla.projection_weights,
    mixing_multiply_adds=attention_mla.mixing_multiply_adds,
    activation_values=attention_mla.activation_values,
    rotary=attention_mla.rotary,
    label=lambda config, spec: f"gla-{spec.n_latent_heads}",
    layer_fields=("n_latent_heads",),
    check_model=check_model,
)
