"""One timed generation with an explicit KV cache: prefill a prompt, then greedy-decode token by
token, measuring wall time of each phase, the bytes the cache tensors really occupy, and peak memory.

It decodes the way ``kvforge generate --decode auto`` does, so the numbers are the ones users get:
with a :class:`~kvforge.arch.StaticDecoder` (fixed shapes, one CUDA-graph replay per token) when one
is given - on CUDA - and with the growing dynamic cache otherwise.
"""

from __future__ import annotations

import resource
import statistics
import sys
import time
from dataclasses import dataclass

import torch

from kvforge.arch import CausalLM, KVCache, StaticDecoder, sample_next


@dataclass
class ProbeResult:
    prefill_s: float
    decode_step_s: list[float]
    cache_bytes: int  # bytes of the distinct tensors behind the cache, after the last step
    cached_tokens: int
    peak_memory_bytes: int | None  # CUDA: peak allocated during the probe; CPU: None
    process_peak_rss_bytes: int  # high-water mark of the whole process (CPU and CUDA)
    generated_ids: torch.Tensor  # (batch, decode_steps + 1): the greedy tokens the probe produced

    @property
    def decode_s_per_token(self) -> float:
        return statistics.median(self.decode_step_s)


def allocated_cache_bytes(cache: KVCache) -> int:
    """Bytes of the tensors the cache holds, each storage counted once: measured from the tensors
    themselves rather than from the cache's own bookkeeping (layers sharing K/V alias one storage)."""
    storages = {}
    for entry in cache.entries:
        for buffer in entry.buffers:
            storage = buffer.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def process_peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB, macOS bytes


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def run_probe(
    model: CausalLM,
    prompt_ids: torch.Tensor,
    decode_steps: int,
    cache_dtype: torch.dtype | None = None,
    decoder: StaticDecoder | None = None,
) -> ProbeResult:
    """Prefill ``prompt_ids`` (batch, prompt) into a fresh cache sized to fit exactly (or the
    ``decoder``'s, reset), then run ``decode_steps`` greedy steps of one token each; the cache ends
    holding prompt + steps tokens."""
    batch, prompt_len = prompt_ids.shape
    total = prompt_len + decode_steps
    if decode_steps < 1:
        raise ValueError(f"decode_steps={decode_steps} must be at least 1")
    if total > model.config.max_seq_len:
        raise ValueError(
            f"prompt ({prompt_len}) + decode_steps ({decode_steps}) = {total} exceeds the model's "
            f"max_seq_len={model.config.max_seq_len}"
        )
    device = prompt_ids.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    if decoder is not None:
        if decoder.cache.max_len != total or decoder.batch != batch:
            raise ValueError(
                f"decoder holds {decoder.batch} x {decoder.cache.max_len} tokens; this probe needs {batch} x {total}"
            )
        cache, prefill, step = decoder.cache, decoder.prefill, decoder.step
    else:
        cache = model.new_cache(batch, total, dtype=cache_dtype)

        def prefill(ids: torch.Tensor) -> torch.Tensor:
            return model(ids, cache=cache, logits_to_keep=1)[:, -1]

        def step(next_ids: torch.Tensor) -> torch.Tensor:
            return model(next_ids[:, None], cache=cache, logits_to_keep=1)[:, -1]

    _synchronize(device)
    start = time.perf_counter()
    generated = [sample_next(prefill(prompt_ids))]
    _synchronize(device)
    prefill_s = time.perf_counter() - start
    steps = []
    for _ in range(decode_steps):
        start = time.perf_counter()
        generated.append(sample_next(step(generated[-1])))
        _synchronize(device)
        steps.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return ProbeResult(
        prefill_s,
        steps,
        allocated_cache_bytes(cache),
        cache.length,
        peak,
        process_peak_rss_bytes(),
        torch.stack(generated, dim=1),
    )
