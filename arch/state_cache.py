"""Cache entries of constant-state layers: a fixed number of bytes per sequence, whatever the context.

A linear-attention layer keeps its running sums ``kv`` / ``k_sum`` (float32) and, with a softmax
window ``W``, the last ``W - 1`` raw keys and values (a shift register, newest last, in the cache
dtype; slots before the first token stay zero and are masked). A Gated DeltaNet layer keeps its state
matrix per head (float32) and the last ``K - 1`` inputs of each short convolution (cache dtype).

Recurrent states stay float32 whatever the cache dtype, as fla and transformers keep them: they are
sums over the whole context, and rounding them to bf16 at every token would drift. Every tensor is
allocated once and updated in place, so a fixed-shape (CUDA-graph) decode step can hold them.
``buffers`` lists every tensor, which is what :meth:`~.cache.KVCache.nbytes` counts.
"""

from __future__ import annotations

import torch


class StateLayerCache:
    """Named fixed-size tensors of one layer; ``reset`` starts a new sequence."""

    names: tuple[str, ...] = ()

    @property
    def buffers(self) -> tuple[torch.Tensor, ...]:
        return tuple(getattr(self, name) for name in self.names)

    def reset(self) -> None:
        for buffer in self.buffers:
            buffer.zero_()

    def append(self, *args, **kwargs):
        raise ValueError("a constant-state layer keeps no K/V for another layer to read (kv_from)")


class LinearStateCache(StateLayerCache):
    names = ("kv", "k_sum", "tail_k", "tail_v")

    def __init__(
        self,
        batch: int,
        heads: int,
        features: int,
        kv_heads: int,
        head_dim: int,
        window: int,
        dtype: torch.dtype,
        device,
    ) -> None:
        self.kv = torch.zeros(batch, heads, features, head_dim, device=device)
        self.k_sum = torch.zeros(batch, heads, features, device=device)
        tail = max(window - 1, 0)
        self.tail_k = torch.zeros(batch, tail, kv_heads, head_dim, dtype=dtype, device=device)
        self.tail_v = torch.zeros(batch, tail, kv_heads, head_dim, dtype=dtype, device=device)


class DeltaNetStateCache(StateLayerCache):
    names = ("state", "conv_q", "conv_k", "conv_v")

    def __init__(
        self,
        batch: int,
        heads: int,
        head_dim: int,
        widths: tuple[int, int, int],
        conv_size: int,
        dtype: torch.dtype,
        device,
    ) -> None:
        self.state = torch.zeros(batch, heads, head_dim, head_dim, device=device)
        q_width, k_width, v_width = widths
        self.conv_q = torch.zeros(batch, conv_size - 1, q_width, dtype=dtype, device=device)
        self.conv_k = torch.zeros(batch, conv_size - 1, k_width, dtype=dtype, device=device)
        self.conv_v = torch.zeros(batch, conv_size - 1, v_width, dtype=dtype, device=device)
