"""Gated DeltaNet (Yang, Kautz & Hatamizadeh 2025), the linear layer of Qwen3-Next: the gated delta rule
(:mod:`kvforge.kernels.deltanet`) over short-convolved, L2-normalised queries and keys, with an output
gate and norm.

Per token ``x`` (fla's ``GatedDeltaNet`` names, which fla-hub checkpoints use):

    q, k, v = silu(conv(q_proj x)), silu(conv(k_proj x)), silu(conv(v_proj x))   (short causal convs)
    q, k    = l2norm(q), l2norm(k)                                                 (per head)
    β       = sigmoid(b_proj x),     g = -exp(A_log) · softplus(a_proj x + dt_bias)   (α = exp(g))
    o       = gated_delta_rule(q, k, v, g, β)
    out     = o_proj(o_norm(o) · silu(g_proj x))                                   (RMSNorm per head)

``n_kv_heads`` states of ``head_dim × head_dim`` are written by ``k``/``v`` heads; query head ``h`` reads
state ``h // (n_heads / n_kv_heads)``, as GQA reads K/V, so a softmax layer converts by keeping
``q_proj, k_proj, v_proj, o_proj`` (no RoPE: the convolutions and the decay carry order). The cache
per sequence is the states (float32) and the convolutions' last ``conv_size - 1`` inputs
(:class:`~.state_cache.DeltaNetStateCache`), however long the context.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from kvforge.kernels.deltanet import gated_delta_rule, gated_delta_rule_step
from kvforge.kernels.short_conv import causal_conv1d

from . import attention_gqa
from .attention_linear import check_positive_field, new_state_cache, per_document, refuse_cache_fields
from .form_record import AttentionForm
from .layers import RMSNorm
from .state_cache import DeltaNetStateCache

if TYPE_CHECKING:  # annotations only: config.py imports the form registry, which imports this module
    from .config import LayerSpec, ModelConfig

DEFAULT_CONV_SIZE = 4  # Qwen3-Next's linear_conv_kernel_dim and fla's conv_size
L2_EPS = 1e-6  # fla's l2norm: x / sqrt(Σx² + eps)
# Mamba-2 / fla initialisation of the decay: A in [1, 16], dt in [1e-3, 0.1] (through softplus).
A_RANGE, DT_RANGE = (1.0, 16.0), (1e-3, 0.1)


class DeltaNetAttention(nn.Module):
    def __init__(self, config: ModelConfig, spec: LayerSpec) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, spec.n_kv_heads, config.head_dim
        self.conv_size = conv_size(spec)
        d, bias = config.d_model, config.attention_bias
        q_width, kv_width = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        self.q_proj = nn.Linear(d, q_width, bias=bias)
        self.k_proj = nn.Linear(d, kv_width, bias=bias)
        self.v_proj = nn.Linear(d, kv_width, bias=bias)
        self.a_proj = nn.Linear(d, self.n_kv_heads, bias=False)
        self.b_proj = nn.Linear(d, self.n_kv_heads, bias=False)
        self.A_log = nn.Parameter(torch.empty(self.n_kv_heads))
        self.dt_bias = nn.Parameter(torch.empty(self.n_kv_heads))
        self.q_conv1d = _short_conv(q_width, self.conv_size)
        self.k_conv1d = _short_conv(kv_width, self.conv_size)
        self.v_conv1d = _short_conv(kv_width, self.conv_size)
        self.g_proj = nn.Linear(d, q_width, bias=False)
        self.o_norm = RMSNorm(self.head_dim, config.norm_eps)
        self.o_proj = nn.Linear(q_width, d, bias=config.o_proj_bias)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Mamba-2's decay init (A, dt log-uniform), identity convolutions (the last tap is the current
        input); the linear layers are the decoder's to initialise."""
        if self.A_log.is_meta:
            return
        low, high = A_RANGE
        self.A_log.copy_(torch.empty(self.n_kv_heads).uniform_(low, high).log())
        low, high = DT_RANGE
        dt = torch.exp(torch.empty(self.n_kv_heads).uniform_(math.log(low), math.log(high)))
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # softplus(dt_bias) = dt
        for conv in (self.q_conv1d, self.k_conv1d, self.v_conv1d):
            conv.weight.zero_()
            conv.weight[..., -1] = 1.0

    def new_state(self, batch: int, dtype: torch.dtype, device) -> DeltaNetStateCache:
        widths = (self.q_proj.out_features, self.k_proj.out_features, self.v_proj.out_features)
        return DeltaNetStateCache(
            batch, self.n_kv_heads, self.head_dim, widths, self.conv_size, dtype, device
        )

    def gates(self, x_btd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Log decay ``g`` and write strength ``β``, ``(b, t, n_kv_heads)`` float32."""
        g = -self.A_log.float().exp() * F.softplus(self.a_proj(x_btd).float() + self.dt_bias.float())
        return g, torch.sigmoid(self.b_proj(x_btd).float())

    def forward(
        self,
        x_btd: torch.Tensor,
        rope=None,
        cache: DeltaNetStateCache | None = None,
        start: int | torch.Tensor = 0,
        shared=None,
        document_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, None]:
        if document_ids is not None:
            return self.o_proj(per_document(self.mix, x_btd, rope, document_ids)), None
        return self.o_proj(self.mix(x_btd, rope, cache)), None

    def mix(self, x_btd: torch.Tensor, rope=None, cache: DeltaNetStateCache | None = None) -> torch.Tensor:
        """The heads' gated, normalised outputs ``(b, t, n_heads · head_dim)`` before ``o_proj``."""
        batch, seq, _ = x_btd.shape
        held = (cache.conv_q, cache.conv_k, cache.conv_v) if cache is not None else (None,) * 3
        q, conv_q = causal_conv1d(self.q_proj(x_btd), self.q_conv1d.weight, held[0])
        k, conv_k = causal_conv1d(self.k_proj(x_btd), self.k_conv1d.weight, held[1])
        v, conv_v = causal_conv1d(self.v_proj(x_btd), self.v_conv1d.weight, held[2])
        q = _l2norm(q.view(batch, seq, self.n_heads, self.head_dim))
        k = _l2norm(k.view(batch, seq, self.n_kv_heads, self.head_dim))
        v = v.view(batch, seq, self.n_kv_heads, self.head_dim)
        g, beta = self.gates(x_btd)
        state = cache.state if cache is not None else None
        rule = gated_delta_rule_step if cache is not None and seq == 1 else gated_delta_rule
        out, state = rule(q, k, v, g, beta, state=state)
        if cache is not None:  # in place: a fixed-shape decode step keeps its buffers
            for buffer, new in zip(
                (cache.state, cache.conv_q, cache.conv_k, cache.conv_v), (state, conv_q, conv_k, conv_v)
            ):
                buffer.copy_(new)
        gate = F.silu(self.g_proj(x_btd)).view(batch, seq, self.n_heads, self.head_dim)
        return (self.o_norm(out) * gate).reshape(batch, seq, -1)


def _short_conv(channels: int, width: int) -> nn.Conv1d:
    return nn.Conv1d(channels, channels, width, groups=channels, bias=False)


def _l2norm(x: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt(x.float().square().sum(-1, keepdim=True) + L2_EPS).to(x.dtype)


# ---------------------------------------------------------------------------------------------- facts
def conv_size(spec: LayerSpec) -> int:
    return spec.conv_size or DEFAULT_CONV_SIZE


def state_bytes(config: ModelConfig, spec: LayerSpec, itemsize: int) -> int:
    """float32 states ``n_kv_heads · head_dim²`` plus ``conv_size - 1`` inputs of q, k and v (cache dtype)."""
    states = spec.n_kv_heads * config.head_dim * config.head_dim
    conv = (conv_size(spec) - 1) * (config.n_heads + 2 * spec.n_kv_heads) * config.head_dim
    return 4 * states + itemsize * conv


def parameters(config: ModelConfig, spec: LayerSpec) -> int:
    d, q_width, kv_width = config.d_model, config.n_heads * config.head_dim, spec.n_kv_heads * config.head_dim
    bias = config.attention_bias
    projections = d * (q_width + 2 * kv_width) + (q_width + 2 * kv_width if bias else 0)
    gates = 2 * d * spec.n_kv_heads + 2 * spec.n_kv_heads  # a_proj, b_proj, A_log, dt_bias
    convs = (q_width + 2 * kv_width) * conv_size(spec)
    output = (
        d * q_width + config.head_dim + q_width * d + (d if config.o_proj_bias else 0)
    )  # g_proj, o_norm, o_proj
    return projections + gates + convs + output


def projection_weights(config: ModelConfig, spec: LayerSpec) -> int:
    """q, k, v, the output gate, the two scalar gates and o_proj."""
    d, q_width, kv_width = config.d_model, config.n_heads * config.head_dim, spec.n_kv_heads * config.head_dim
    return d * (3 * q_width + 2 * kv_width + 2 * spec.n_kv_heads)


def mixing_multiply_adds(config: ModelConfig, spec: LayerSpec, context: int) -> int:
    """The delta rule per token: read a key's value from the state, write the correction, decay, and each
    query head reads the state (about 3 ``head_dim²`` products per state head, 1 per query head); the
    convolutions add ``conv_size`` per channel. Independent of ``context``."""
    square = config.head_dim * config.head_dim
    convs = conv_size(spec) * (config.n_heads + 2 * spec.n_kv_heads) * config.head_dim
    return 3 * spec.n_kv_heads * square + config.n_heads * square + convs


def activation_values(config: ModelConfig, spec: LayerSpec) -> int:
    """Projections before and after the convolutions, normalised q/k, the gate and the gated output."""
    q_width, kv_width = config.n_heads * config.head_dim, spec.n_kv_heads * config.head_dim
    return 6 * q_width + 5 * kv_width + 4 * spec.n_kv_heads


def check_layer(config: ModelConfig, index: int, spec: LayerSpec) -> None:
    attention_gqa.check_kv_heads(config, index, spec)
    check_positive_field(index, spec, "conv_size")


def check_model(config: ModelConfig) -> None:
    refuse_cache_fields(config, "deltanet", ("kv_from", "sinks", "chunk", "window"))


DELTANET = AttentionForm(
    name="deltanet",
    block=DeltaNetAttention,
    kv_values_per_token=lambda config, spec: 0,
    parameters=parameters,
    projection_weights=projection_weights,
    mixing_multiply_adds=mixing_multiply_adds,
    activation_values=activation_values,
    rotary=lambda config, spec: None,  # order comes from the convolutions and the decay
    label=lambda config, spec: f"deltanet-{spec.n_kv_heads}",
    layer_fields=("n_kv_heads", "conv_size"),
    check_layer=check_layer,
    check_model=check_model,
    traits=frozenset({"nope"}),  # rope=False changes nothing: it never rotates
    state_bytes_per_sequence=state_bytes,
    new_cache=new_state_cache,
)
