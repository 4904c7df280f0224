"""Explicit KV cache: one preallocated entry per layer, aliases for layers that share K/V.

An entry stores one or more *streams* per position (GQA: K and V; MLA: the latent with the rotary
key appended, ``kv_lora_rank + rope`` wide). Global layers keep every position; a sliding-window
layer keeps a ring buffer of ``W`` positions, so its bytes stop growing at ``W`` tokens; a chunked
layer keeps ``C`` slots that restart at every chunk boundary.
``nbytes()`` is measured from the allocated tensors and must equal
:func:`kvforge.arch.kv_bytes.kv_cache_bytes` - the byte count is part of the contract.

A *static* cache (``model.new_cache(..., static=True)``) is the same buffers plus the current
position as a device tensor: a one-token step then writes at that position and attends over the
whole buffer with a fill-length mask, so no shape, address or host-side number changes from one
token to the next and the step can be captured in a CUDA graph (see :mod:`.static_decode`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class KVView:
    """What a layer attends over after appending its new tokens: per-stream tensors
    ``(batch, k_len, *feature)`` and how queries (aligned to the end) may see them."""

    streams: tuple[torch.Tensor, ...]
    causal: bool = True
    window: int | None = None
    kv_lens: torch.Tensor | None = None  # static cache: only slots < kv_lens[b] are filled
    chunk: int | None = None  # chunked local attention; key 0 then starts a chunk

    def attention_kwargs(self) -> dict:
        """How queries may see these keys, as :func:`kvforge.kernels.attention` keywords."""
        return {"causal": self.causal, "window": self.window, "kv_lens": self.kv_lens, "chunk": self.chunk}


class _LayerBuffers:
    """Preallocated ``(batch, slots, *feature)`` buffers, one per stream, and the static decode write."""

    ordered = True  # slot order is position order (False for a ring that has wrapped)

    def __init__(self, batch: int, slots: int, features: list[tuple[int, ...]], dtype, device) -> None:
        self.buffers = tuple(
            torch.zeros(batch, slots, *shape, dtype=dtype, device=device) for shape in features
        )
        self.slots = slots

    def append(self, new: tuple[torch.Tensor, ...], start: int | torch.Tensor, window: int | None) -> KVView:
        """Write the new positions and return what the layer attends over. ``start`` is the position
        of the first new token: a host int (prefill, dynamic decode) or, for a static cache's
        one-token step, a ``(1,)`` device tensor. The new values are stored in the buffers' dtype, and a
        block attends over them as stored, as it does over the earlier positions."""
        new = tuple(values.to(buffer.dtype) for buffer, values in zip(self.buffers, new))
        if isinstance(start, torch.Tensor):
            return self.append_at(new, start, window)
        return self.append_block(new, start, window)

    def append_block(self, new: tuple[torch.Tensor, ...], start: int, window: int | None) -> KVView:
        raise NotImplementedError

    def append_at(self, new: tuple[torch.Tensor, ...], position: torch.Tensor, window: int | None) -> KVView:
        """One token at the device-side ``position`` (shape ``(1,)``): write slot ``position % slots``
        and attend over the whole buffer masked by its fill length - fixed shapes, no host sync."""
        slot = position % self.slots
        for buffer, values in zip(self.buffers, new):
            buffer.index_copy_(1, slot, values)
        kv_lens = (position + 1).clamp(max=self.slots)
        # A ring holds exactly the window once full (and only in-window positions before): no window mask.
        return KVView(self.buffers, causal=True, window=window if self.ordered else None, kv_lens=kv_lens)


class DenseLayerCache(_LayerBuffers):
    """Every position up to ``max_len``; appending is a slice write, reading a prefix view (no copy)."""

    def __init__(self, batch: int, max_len: int, features: list[tuple[int, ...]], dtype, device) -> None:
        super().__init__(batch, max_len, features, dtype, device)

    def append_block(self, new: tuple[torch.Tensor, ...], start: int, window: int | None) -> KVView:
        end = start + new[0].shape[1]
        for buffer, values in zip(self.buffers, new):
            buffer[:, start:end] = values
        return KVView(tuple(buffer[:, :end] for buffer in self.buffers), causal=True, window=window)


class RingLayerCache(_LayerBuffers):
    """The last ``window`` positions in a ring buffer: position ``p`` lives in slot ``p % window``.

    Decoding one token writes it and attends over the ring as is (attention does not care about key
    order; every slot then holds a position inside the window). A block of several tokens first
    reads the old window in order, attends over ``old + new`` with a causal window mask, then keeps
    the last ``window`` new positions - writing first would overwrite keys the block still needs.
    """

    ordered = False

    def __init__(self, batch: int, window: int, features: list[tuple[int, ...]], dtype, device) -> None:
        super().__init__(batch, window, features, dtype, device)

    def append_block(self, new: tuple[torch.Tensor, ...], start: int, window: int | None) -> KVView:
        size = self.slots
        n_new = new[0].shape[1]
        if n_new == 1:
            slot = start % size
            for buffer, values in zip(self.buffers, new):
                buffer[:, slot] = values[:, 0]
            filled = min(start + 1, size)  # before the ring wraps, slots 0..start hold positions 0..start
            return KVView(tuple(buffer[:, :filled] for buffer in self.buffers), causal=False, window=None)
        n_old = min(start, size)
        device = self.buffers[0].device
        old_slots = torch.arange(start - n_old, start, device=device) % size
        streams = tuple(
            torch.cat((buffer.index_select(1, old_slots), values), dim=1) if n_old else values
            for buffer, values in zip(self.buffers, new)
        )
        kept = min(n_new, size)
        new_slots = torch.arange(start + n_new - kept, start + n_new, device=device) % size
        for buffer, values in zip(self.buffers, new):
            buffer.index_copy_(1, new_slots, values[:, n_new - kept :])
        return KVView(streams, causal=True, window=window)


class ChunkLayerCache(_LayerBuffers):
    """Chunked local attention: position ``p`` lives in slot ``p % chunk`` and the slots restart at each
    chunk boundary, so slots ``0..p % chunk`` are exactly the keys ``p`` may see, in order.

    A block of tokens attends over the filled slots of its first chunk followed by the new tokens
    (key 0 then starts a chunk, as the kernel's ``chunk`` mask assumes); only the new positions of
    its last chunk are kept.
    """

    def __init__(self, batch: int, chunk: int, features: list[tuple[int, ...]], dtype, device) -> None:
        super().__init__(batch, chunk, features, dtype, device)

    def append_block(self, new: tuple[torch.Tensor, ...], start: int, window: int | None) -> KVView:
        size, n_new = self.slots, new[0].shape[1]
        filled = start % size  # positions start - filled .. start - 1 of this chunk, in slots 0..filled-1
        if n_new == 1:
            for buffer, values in zip(self.buffers, new):
                buffer[:, filled] = values[:, 0]
            return KVView(tuple(buffer[:, : filled + 1] for buffer in self.buffers), causal=False)
        streams = tuple(
            torch.cat((buffer[:, :filled], values), dim=1) if filled else values
            for buffer, values in zip(self.buffers, new)
        )
        end = start + n_new
        keep_from = max(start, (end - 1) // size * size)  # the new positions of the last chunk
        for buffer, values in zip(self.buffers, new):
            buffer[:, keep_from % size : keep_from % size + end - keep_from] = values[:, keep_from - start :]
        return KVView(streams, causal=True, chunk=size)

    def append_at(self, new: tuple[torch.Tensor, ...], position: torch.Tensor, window: int | None) -> KVView:
        slot = position % self.slots
        for buffer, values in zip(self.buffers, new):
            buffer.index_copy_(1, slot, values)
        return KVView(self.buffers, causal=True, kv_lens=slot + 1)  # the filled slots are this chunk


LayerCache = DenseLayerCache | RingLayerCache | ChunkLayerCache  # and .state_cache's, for state layers


class KVCache:
    """Per-layer cache entries for one batch of sequences decoded in lockstep.

    Built by ``model.new_cache(batch, max_len, dtype)``; passed to ``model(input_ids, cache=cache)``,
    which appends the new tokens of every layer and then advances ``length``.
    """

    def __init__(
        self, entries: list[LayerCache], owners: list[int], max_len: int, position: torch.Tensor | None = None
    ) -> None:
        self.entries = entries  # entries[i] is the cache of layer i (shared layers alias their source)
        self.owners = owners  # owners[i]: index of the layer that writes entries[i]
        self.max_len = max_len
        self.length = 0
        # Static caches: the length again, as a (1,) device tensor that one-token steps read and advance.
        self.position = position

    @property
    def static(self) -> bool:
        return self.position is not None

    def reset(self) -> None:
        """Forget every cached token (buffers are reused; stale slots are masked by the fill length)."""
        self.length = 0
        if self.position is not None:
            self.position.zero_()
        for entry in self.entries:  # constant-state layers: their sums are not masked by a length
            reset = getattr(entry, "reset", None)
            if reset is not None:
                reset()

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, layer: int) -> LayerCache:
        return self.entries[layer]

    def check_room(self, n_new: int) -> None:
        if self.length + n_new > self.max_len:
            raise ValueError(
                f"KV cache is full: {self.length} cached + {n_new} new tokens > max_len={self.max_len}; "
                "create the cache with a larger max_len"
            )

    def advance(self, n_new: int) -> None:
        self.length += n_new
        if self.position is not None:
            self.position.add_(n_new)

    def nbytes(self) -> int:
        """Bytes actually allocated by the cache tensors (aliased entries counted once)."""
        return sum(self.layer_nbytes(layer) for layer in range(len(self.entries)))

    def layer_nbytes(self, layer: int) -> int:
        """Bytes that layer ``layer`` owns (0 for a layer reading another layer's K/V)."""
        if self.owners[layer] != layer:
            return 0
        return sum(buffer.numel() * buffer.element_size() for buffer in self.entries[layer].buffers)


def allocate_layer_cache(
    batch: int,
    max_len: int,
    window: int | None,
    features: list[tuple[int, ...]],
    dtype,
    device,
    chunk: int | None = None,
) -> LayerCache:
    # A chunk or window of max_len or more never hides a key of a max_len-token sequence: dense.
    if chunk is not None and chunk < max_len:
        return ChunkLayerCache(batch, chunk, features, dtype, device)
    if window is not None and window < max_len:
        return RingLayerCache(batch, window, features, dtype, device)
    return DenseLayerCache(batch, max_len, features, dtype, device)
