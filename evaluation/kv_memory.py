"""KV-cache bytes measured from a real generation against the analytic figure, and peak memory.

The measured figure comes from the tensors behind the cache after the last decode step
(:func:`.decode_probe.allocated_cache_bytes`), the analytic one from the config alone
(:func:`kvforge.arch.kv_cache_bytes`): the two must agree for every form, and their ratio to the
MHA-equivalent model is the memory saving a user is buying.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvforge.arch import CausalLM, kv_cache_bytes, mha_equivalent
from kvforge.evaluation.schema import documented

from .decode_probe import ProbeResult


@dataclass
class MemoryRow:
    batch: int = documented("sequences decoded together")
    context: int = documented("tokens held in the cache at the end of the generation (prompt + decode steps)")
    cache_dtype: str = documented("element type of the cache tensors")
    measured_cache_bytes: int = documented(
        "bytes of the distinct tensors behind the cache after the last decode step (aliased storage of "
        "layers sharing K/V counted once)"
    )
    analytic_cache_bytes: int = documented(
        "bytes the config says a cache of `batch` x `context` tokens needs"
    )
    matches_analytic: bool = documented("measured_cache_bytes == analytic_cache_bytes")
    measured_bytes_per_token: float = documented("measured_cache_bytes / (batch * context)")
    mha_bytes_per_token: float = documented(
        "the same figure for the model with plain multi-head attention on every layer (global, no sharing)"
    )
    ratio_vs_mha: float = documented("measured_bytes_per_token / mha_bytes_per_token")
    weights_bytes: int = documented("bytes of the model parameters (tied weights counted once)")
    peak_memory_bytes: int | None = documented(
        "CUDA: peak bytes allocated by torch during the generation (weights included); null on CPU, "
        "where torch keeps no allocator statistics"
    )
    process_peak_rss_bytes: int = documented(
        "peak resident memory of the whole evaluation process so far (getrusage): an upper bound on CPU"
    )


def weights_bytes(model: CausalLM) -> int:
    unique = {p.data_ptr(): p.numel() * p.element_size() for p in model.parameters()}
    return sum(unique.values())


def memory_row(model: CausalLM, probe: ProbeResult, batch: int, cache_dtype: torch.dtype) -> MemoryRow:
    context = probe.cached_tokens
    analytic = kv_cache_bytes(model.config, context, cache_dtype, batch)
    mha = kv_cache_bytes(mha_equivalent(model.config), context, cache_dtype, batch)
    per_token = probe.cache_bytes / (batch * context)
    return MemoryRow(
        batch=batch,
        context=context,
        cache_dtype=str(cache_dtype).removeprefix("torch."),
        measured_cache_bytes=probe.cache_bytes,
        analytic_cache_bytes=analytic,
        matches_analytic=probe.cache_bytes == analytic,
        measured_bytes_per_token=per_token,
        mha_bytes_per_token=mha / (batch * context),
        ratio_vs_mha=probe.cache_bytes / mha,
        weights_bytes=weights_bytes(model),
        peak_memory_bytes=probe.peak_memory_bytes,
        process_peak_rss_bytes=probe.process_peak_rss_bytes,
    )
