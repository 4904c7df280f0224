"""Prefill and decode latency and tokens/s versus context length and batch size.

Each (batch, context) point prefills ``context - decode_steps`` random tokens into a fresh cache and
then decodes ``decode_steps`` tokens one at a time, so the decode steps run with a nearly full cache
of ``context`` tokens - the regime where a smaller KV cache pays off. The median over ``repeats``
runs (after one warm-up) is reported. On CUDA the decode runs in a :class:`~kvforge.arch.StaticDecoder`
(one CUDA-graph replay per token, captured during the warm-up), on CPU with the dynamic cache - as
``kvforge generate --decode auto`` does. The same generations also give the memory rows.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

import torch

from kvforge.arch import CausalLM, StaticDecoder
from kvforge.evaluation.schema import documented

from .decode_probe import run_probe
from .kv_memory import MemoryRow, memory_row
from .perplexity import check_context


@dataclass
class LatencyRow:
    batch: int = documented("sequences decoded together")
    context: int = documented("tokens in the cache after the last decode step")
    prompt_tokens: int = documented("tokens prefilled per sequence (`context - decode_steps`)")
    decode_steps: int = documented("single-token decode steps timed after the prefill")
    repeats: int = documented("timed generations; the figures are their medians")
    decode_loop: str = documented(
        "how the tokens were decoded: 'static+cuda-graph' (fixed-shape cache, one graph replay per token) "
        "or 'dynamic' (growing cache, eager)"
    )
    prefill_s: float = documented("seconds to prefill the prompt of every sequence and pick the first token")
    prefill_tokens_per_s: float = documented("batch * prompt_tokens / prefill_s")
    decode_ms_per_step: float = documented(
        "milliseconds of one decode step (one new token for every sequence)"
    )
    decode_tokens_per_s: float = documented("batch / decode step time: new tokens per second over the batch")


def measure_decode(
    model: CausalLM,
    batches: list[int],
    contexts: list[int],
    decode_steps: int = 16,
    repeats: int = 3,
    cache_dtype: torch.dtype | None = None,
    seed: int = 0,
) -> tuple[list[LatencyRow], list[MemoryRow]]:
    """Time every (batch, context) and measure its cache; returns the latency and the memory rows."""
    if repeats < 1:
        raise ValueError(f"repeats={repeats} must be at least 1")
    if any(b < 1 for b in batches):
        raise ValueError(f"batch sizes {batches} must all be at least 1")
    for context in contexts:
        check_context(model, context, "latency contexts")
        if context <= decode_steps:
            raise ValueError(f"latency context {context} must exceed decode_steps={decode_steps}")
    device = model.model.embed_tokens.weight.device
    cache_dtype = cache_dtype or model.model.embed_tokens.weight.dtype
    generator = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()
    static = device.type == "cuda"
    latency, memory = [], []
    for batch in batches:
        for context in contexts:
            prompt_len = context - decode_steps
            prompt = torch.randint(0, model.config.vocab_size, (batch, prompt_len), generator=generator)
            prompt = prompt.to(device)
            decoder = StaticDecoder(model, batch, context, dtype=cache_dtype) if static else None
            run_probe(model, prompt, decode_steps, cache_dtype, decoder)  # warm-up (and graph capture)
            probes = [run_probe(model, prompt, decode_steps, cache_dtype, decoder) for _ in range(repeats)]
            prefill_s = statistics.median(p.prefill_s for p in probes)
            step_s = statistics.median(p.decode_s_per_token for p in probes)
            latency.append(
                LatencyRow(
                    batch=batch,
                    context=context,
                    prompt_tokens=prompt_len,
                    decode_steps=decode_steps,
                    repeats=repeats,
                    decode_loop="static+cuda-graph" if static else "dynamic",
                    prefill_s=prefill_s,
                    prefill_tokens_per_s=batch * prompt_len / prefill_s,
                    decode_ms_per_step=step_s * 1e3,
                    decode_tokens_per_s=batch / step_s,
                )
            )
            memory.append(memory_row(model, probes[-1], batch, cache_dtype))
    model.train(was_training)
    return latency, memory
