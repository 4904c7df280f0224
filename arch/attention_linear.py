"""Linear attention with Hedgehog feature maps, optionally with a softmax sliding window in the same layer
(LoLCATs, Zhang et al. 2025): the math is :mod:`kvforge.kernels.linear_attention`.

The projections are GQA's (``q_proj, k_proj, v_proj, o_proj``, RoPE, Qwen's biases and q/k norms), so a
softmax layer converts by keeping them and learning the new parameters only:

- ``feature_map_q`` / ``feature_map_k`` ``(n_heads, head_dim, feature_dim)``: Hedgehog's learned
  projections (``φ(x) = [softmax(xW), softmax(-xW)]``, ``2 · feature_dim`` features); identity at init
  (``feature_dim = head_dim``), so ``φ(q)·φ(k)`` starts as a sum of ``exp(q_i + k_i)`` terms. Each query
  head has its own key map (LoLCATs repeats K/V before the map), so the state is per query head.
- ``window_factors`` ``(n_heads,)`` with a window: the softmax terms weigh ``sigmoid(window_factors)``
  against the linear ones (LoLCATs' ``window_factors``; 0 at init).

A ``linear`` layer caches no token: its state is ``n_heads · 2F · (head_dim + 1)`` float32 values plus
``W - 1`` keys and values of the window (:class:`~.state_cache.LinearStateCache`).
"""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING

import torch
from torch import nn

from kvforge.kernels.documents import document_cu_seqlens
from kvforge.kernels.linear_attention import (
    LinearState,
    hedgehog_features,
    linear_attention,
    linear_attention_step,
)

from . import attention_gqa
from .attention_gqa import GQAAttention
from .form_record import AttentionForm
from .state_cache import LinearStateCache

if TYPE_CHECKING:  # annotations only: config.py imports the form registry, which imports this module
    from .config import LayerSpec, ModelConfig


class LinearAttention(GQAAttention):
    def __init__(self, config: ModelConfig, spec: LayerSpec) -> None:
        super().__init__(config, spec)
        self.window = spec.window or 0  # 0: linear attention over every key
        self.feature_dim = linear_feature_dim(config, spec)
        shape = (self.n_heads, self.head_dim, self.feature_dim)
        self.feature_map_q = nn.Parameter(torch.empty(shape))
        self.feature_map_k = nn.Parameter(torch.empty(shape))
        self.window_factors = nn.Parameter(torch.empty(self.n_heads)) if self.window else None
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Identity feature maps, window factors 0 (the projections are the decoder's to initialise)."""
        if self.feature_map_q.is_meta:
            return
        eye = torch.eye(self.head_dim, self.feature_dim).expand(self.n_heads, -1, -1)
        self.feature_map_q.copy_(eye)
        self.feature_map_k.copy_(eye)
        if self.window_factors is not None:
            self.window_factors.zero_()

    def new_state(self, batch: int, dtype: torch.dtype, device) -> LinearStateCache:
        features = 2 * self.feature_dim
        return LinearStateCache(
            batch, self.n_heads, features, self.n_kv_heads, self.head_dim, self.window, dtype, device
        )

    def key_features(self, k_bthd: torch.Tensor) -> torch.Tensor:
        """Features of keys ``(b, t, n_kv_heads, d)`` under each query head's key map: ``(b, t, n_heads, 2F)``."""
        group = self.n_heads // self.n_kv_heads
        return hedgehog_features(k_bthd.repeat_interleave(group, dim=2), self.feature_map_k)

    def window_weight(self) -> torch.Tensor | None:
        return torch.sigmoid(self.window_factors) if self.window_factors is not None else None

    def forward(
        self,
        x_btd: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        cache: LinearStateCache | None,
        start: int | torch.Tensor,
        shared=None,
        document_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, None]:
        if document_ids is not None:
            return self.o_proj(per_document(self.mix, x_btd, rope, document_ids)), None
        return self.o_proj(self.mix(x_btd, rope, cache, start)), None

    def mix(
        self,
        x_btd: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        cache: LinearStateCache | None = None,
        start: int | torch.Tensor = 0,
    ) -> torch.Tensor:
        """The heads' outputs ``(b, t, n_heads · head_dim)`` before ``o_proj``."""
        batch, seq, _ = x_btd.shape
        q, (k, v) = self.query(x_btd, rope), self.states(x_btd, rope)
        fq = hedgehog_features(q, self.feature_map_q)
        options = {"window": self.window, "window_weight": self.window_weight(), "scale": self.scale}
        if cache is None:
            out, _ = linear_attention(q, k, v, fq, self.key_features(k), **options)
        elif seq == 1:
            out = self._step(q, k, v, fq, cache, start, options)
        else:
            out = self._block(q, k, v, fq, cache, start, options)
        return out.reshape(batch, seq, -1)

    def _block(self, q, k, v, fq, cache: LinearStateCache, start: int, options) -> torch.Tensor:
        """Several new tokens after ``start`` cached ones: the chunked form over the window's last keys
        and the new ones, from the cached sums."""
        if not isinstance(start, int):
            raise ValueError("a linear layer runs a block of tokens from a host-side position only")
        tail = cache.tail_k.shape[1]
        held = min(start, tail)
        k_all = torch.cat((cache.tail_k[:, tail - held :].to(k.dtype), k), dim=1)
        v_all = torch.cat((cache.tail_v[:, tail - held :].to(v.dtype), v), dim=1)
        state = LinearState(cache.kv, cache.k_sum)
        out, state = linear_attention(q, k_all, v_all, fq, self.key_features(k_all), state=state, **options)
        self._keep(cache, state, k_all, v_all)
        return out

    def _step(self, q, k, v, fq, cache: LinearStateCache, start, options) -> torch.Tensor:
        """One new token with fixed shapes: every window slot is passed, the empty ones masked, and the
        oldest key enters the sums by a 0/1 weight - so ``start`` may be a device tensor."""
        state = LinearState(cache.kv, cache.k_sum)
        if not self.window:
            out, state = linear_attention_step(q, k, v, fq, self.key_features(k), state=state, **options)
            self._keep(cache, state, k, v)
            return out
        tail = cache.tail_k.shape[1]
        k_all = torch.cat((cache.tail_k.to(k.dtype), k), dim=1)
        v_all = torch.cat((cache.tail_v.to(v.dtype), v), dim=1)
        position = torch.as_tensor(start, device=q.device).reshape(())
        valid = torch.arange(tail + 1, device=q.device) >= tail - position.clamp(max=tail)
        absorb = position >= tail
        out, state = linear_attention_step(
            q,
            k_all,
            v_all,
            fq,
            self.key_features(k_all[:, :1]),
            state=state,
            valid=valid,
            absorb=absorb,
            **options,
        )
        self._keep(cache, state, k_all, v_all)
        return out

    @staticmethod
    def _keep(cache: LinearStateCache, state: LinearState, k_all: torch.Tensor, v_all: torch.Tensor) -> None:
        cache.kv.copy_(state.kv)
        cache.k_sum.copy_(state.k_sum)
        tail = cache.tail_k.shape[1]
        if tail:  # the last W - 1 keys; zeros stay in front while the sequence is shorter
            cache.tail_k.copy_(torch.cat((cache.tail_k, k_all.to(cache.tail_k.dtype)), dim=1)[:, -tail:])
            cache.tail_v.copy_(torch.cat((cache.tail_v, v_all.to(cache.tail_v.dtype)), dim=1)[:, -tail:])


# ---------------------------------------------------------------------------------------------- facts
def linear_feature_dim(config: ModelConfig, spec: LayerSpec) -> int:
    return spec.feature_dim or config.head_dim


def state_bytes(config: ModelConfig, spec: LayerSpec, itemsize: int) -> int:
    """float32 sums ``n_heads · 2F · (head_dim + 1)`` plus ``W - 1`` window keys and values (cache dtype)."""
    features = 2 * linear_feature_dim(config, spec)
    sums = config.n_heads * features * (config.head_dim + 1)
    window = 2 * max((spec.window or 0) - 1, 0) * spec.n_kv_heads * config.head_dim
    return 4 * sums + itemsize * window


def parameters(config: ModelConfig, spec: LayerSpec) -> int:
    """GQA's projections, two feature maps and the window factors."""
    maps = 2 * config.n_heads * config.head_dim * linear_feature_dim(config, spec)
    return attention_gqa.parameters(config, spec) + maps + (config.n_heads if spec.window else 0)


def projection_weights(config: ModelConfig, spec: LayerSpec) -> int:
    """GQA's projections plus the feature maps (each query head maps its query and its key)."""
    maps = 2 * config.n_heads * config.head_dim * linear_feature_dim(config, spec)
    return attention_gqa.projection_weights(config, spec) + maps


def mixing_multiply_adds(config: ModelConfig, spec: LayerSpec, context: int) -> int:
    """Softmax over the window's keys, plus reading and writing ``2F × (head_dim + 1)`` sums per head."""
    features = 2 * linear_feature_dim(config, spec)
    window = attention_gqa.mixing_multiply_adds(config, spec, min(spec.window or 0, context))
    return window + 2 * config.n_heads * features * (config.head_dim + 1)


def activation_values(config: ModelConfig, spec: LayerSpec) -> int:
    """GQA's, plus the query and key features of every head."""
    features = 2 * linear_feature_dim(config, spec)
    return attention_gqa.activation_values(config, spec) + 2 * config.n_heads * features


def check_model(config: ModelConfig) -> None:
    """RoPE rotates pairs; a linear layer keeps a state, so no cache of it can be shared, chunked or sunk."""
    attention_gqa.check_model(config)
    refuse_cache_fields(config, "linear", ("kv_from", "sinks", "chunk"))


def check_layer(config: ModelConfig, index: int, spec: LayerSpec) -> None:
    attention_gqa.check_kv_heads(config, index, spec)
    check_positive_field(index, spec, "feature_dim")


def check_positive_field(index: int, spec: LayerSpec, name: str) -> None:
    value = getattr(spec, name)
    if value is not None and value <= 0:
        raise ValueError(
            f"ModelConfig.layers[{index}].{name}={value}: must be a positive integer or None (default)"
        )


def refuse_cache_fields(config: ModelConfig, form: str, names: tuple[str, ...]) -> None:
    """Constant-state layers of ``form`` keep a fixed-size state, not per-token K/V: refuse the fields
    that describe such a cache (``kv_from``, ``sinks``, ``chunk``, ``window``), naming the layer."""
    defaults = {"kv_from": None, "sinks": False, "chunk": None, "window": None}
    for index, spec in enumerate(config.layers):
        if spec.attention != form:
            continue
        for name in names:
            value = getattr(spec, name)
            if value != defaults[name]:
                raise ValueError(
                    f"ModelConfig.layers[{index}].{name}={value}: a {form!r} layer keeps a fixed-size state, "
                    f"not per-token K/V another layer could read, sink, chunk or window (allowed: "
                    f"{name}={defaults[name]})"
                )


def new_state_cache(block, spec: LayerSpec, batch: int, max_len: int, dtype: torch.dtype, device):
    """A fixed-size state per sequence, whatever ``max_len``."""
    return block.new_state(batch, dtype, device)


def per_document(mix, x_btd: torch.Tensor, rope, document_ids: torch.Tensor) -> torch.Tensor:
    """``mix`` run on each packed document alone (a fresh state per document, positions as the decoder
    restarted them): what the documents compute one by one, as packed softmax attention does."""
    batch, seq, _ = x_btd.shape
    cu_seqlens, _ = document_cu_seqlens(document_ids)
    bounds = cu_seqlens.tolist()
    x_flat = x_btd.reshape(1, batch * seq, -1)
    if rope is None:  # a form without RoPE
        parts = [mix(x_flat[:, a:b], None) for a, b in itertools.pairwise(bounds)]
    else:
        cos, sin = (t.expand(batch, seq, -1).reshape(batch * seq, -1) for t in rope)
        parts = [mix(x_flat[:, a:b], (cos[a:b], sin[a:b])) for a, b in itertools.pairwise(bounds)]
    return torch.cat(parts, dim=1).view(batch, seq, -1)


LINEAR = AttentionForm(
    name="linear",
    block=LinearAttention,
    kv_values_per_token=lambda config, spec: 0,
    parameters=parameters,
    projection_weights=projection_weights,
    mixing_multiply_adds=mixing_multiply_adds,
    activation_values=activation_values,
    rotary=attention_gqa.rotary,
    label=lambda config, spec: "linear" if spec.window is None else f"linear+w{spec.window}",
    layer_fields=("n_kv_heads", "feature_dim"),
    check_layer=check_layer,
    check_model=check_model,
    traits=frozenset({"nope", "window_rope_theta", "query_pre_attn_scalar"}),
    state_bytes_per_sequence=state_bytes,
    new_cache=new_state_cache,
)
