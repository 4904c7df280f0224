"""Token generation: one prefill, then one token per step, with the dynamic KV cache (default), the
static fixed-shape cache (``static=True``, CUDA-graph captured on CUDA), or no cache at all (the
reference the cached paths are tested against). All three share one sampling loop."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .model import CausalLM
from .static_decode import StaticDecoder

# With a static cache, check "has every row emitted EOS?" (a host sync) only every this many tokens.
EOS_CHECK_EVERY = 16


def sample_next(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Next ids ``(batch,)`` from last-position logits ``(batch, vocab)``; temperature 0 = greedy."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) > top_p  # keep the smallest set reaching top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


@dataclass
class Sampling:
    """How the next token is chosen (temperature 0 = greedy) and which token ends a row."""

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    eos_token_id: int | Sequence[int] | None = None
    generator: torch.Generator | None = None


def decode_loop(
    first_logits: torch.Tensor,
    next_logits: Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor],
    input_ids: torch.Tensor,
    max_new_tokens: int,
    sampling: Sampling,
    eos_check_every: int = 1,
) -> torch.Tensor:
    """Sample ``max_new_tokens`` tokens into a preallocated ``(batch, prompt + new)`` tensor.

    ``next_logits(next_ids, tokens, step)`` returns the logits after ``next_ids``. Rows that emit
    ``eos_token_id`` keep emitting it; once every row has, generation stops - checked every
    ``eos_check_every`` tokens, and the result is trimmed to where checking each token would stop.
    """
    batch, prompt_len = input_ids.shape
    tokens = input_ids.new_empty(batch, prompt_len + max_new_tokens)
    tokens[:, :prompt_len] = input_ids
    stops = _stop_ids(sampling.eos_token_id, input_ids.device)
    finished = torch.zeros(batch, dtype=torch.bool, device=input_ids.device)
    steps_taken = torch.zeros((), dtype=torch.long, device=input_ids.device)  # before all rows finished
    logits = first_logits
    for step in range(max_new_tokens):
        next_ids = sample_next(
            logits, sampling.temperature, sampling.top_k, sampling.top_p, sampling.generator
        )
        if stops is not None:
            steps_taken += ~finished.all()
            next_ids = torch.where(finished, tokens[:, prompt_len + step - 1], next_ids)  # repeats its stop
            finished |= torch.isin(next_ids, stops)
        tokens[:, prompt_len + step] = next_ids
        if step + 1 == max_new_tokens:
            break
        if stops is not None and (step + 1) % eos_check_every == 0 and bool(finished.all()):
            break
        logits = next_logits(next_ids, tokens, step)
    new = max_new_tokens if stops is None else int(steps_taken)
    return tokens[:, : prompt_len + new]


def _stop_ids(eos_token_id: int | Sequence[int] | None, device: torch.device) -> torch.Tensor | None:
    """The ids that end a row as a 1-D tensor (None: no stop id). Several ids, as Llama-3's and Qwen's
    configs list them, all stop a row (as ``transformers``' ``generate`` does)."""
    if eos_token_id is None:
        return None
    ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    if not ids or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        raise ValueError(f"eos_token_id={eos_token_id!r} must be a token id or a non-empty list of token ids")
    return torch.tensor(ids, dtype=torch.long, device=device)


@torch.no_grad()
def generate(
    model: CausalLM,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    use_cache: bool = True,
    cache_dtype: torch.dtype | None = None,
    generator: torch.Generator | None = None,
    static: bool = False,
    cuda_graph: bool | None = None,
    decoder: StaticDecoder | None = None,
) -> torch.Tensor:
    """Prompt + continuation ``(batch, prompt + new)``. Rows that emit ``eos_token_id`` (an id, or a list
    of ids any of which stops a row) keep emitting it;
    generation stops early once every row has. ``use_cache=False`` recomputes the whole prefix each step
    (the reference that cached decoding is tested against). ``static=True`` decodes with fixed shapes
    (:class:`StaticDecoder`; ``cuda_graph`` as there); pass a ``decoder`` to reuse one (and its graph)."""
    if max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be positive")
    batch, prompt_len = input_ids.shape
    total = prompt_len + max_new_tokens
    if total > model.config.max_seq_len:
        raise ValueError(
            f"prompt ({prompt_len}) + max_new_tokens ({max_new_tokens}) = {total} exceeds the model's "
            f"max_seq_len={model.config.max_seq_len}"
        )
    sampling = Sampling(temperature, top_k, top_p, eos_token_id, generator)
    if decoder is not None or static:
        if not use_cache:
            raise ValueError("static=True / decoder= decode with a cache; use_cache=False contradicts them")
        decoder = decoder or StaticDecoder(model, batch, total, dtype=cache_dtype, cuda_graph=cuda_graph)
        if decoder.cache.max_len < total:
            raise ValueError(
                f"decoder holds {decoder.cache.max_len} tokens per row, prompt + max_new_tokens needs {total}"
            )
        first = decoder.prefill(input_ids)
        return decode_loop(
            first,
            lambda next_ids, tokens, step: decoder.step(next_ids),
            input_ids,
            max_new_tokens,
            sampling,
            eos_check_every=EOS_CHECK_EVERY,
        )
    if not use_cache:

        def uncached(next_ids, tokens, step):
            return model(tokens[:, : prompt_len + step + 1], logits_to_keep=1)[:, -1]

        return decode_loop(
            model(input_ids, logits_to_keep=1)[:, -1], uncached, input_ids, max_new_tokens, sampling
        )
    cache = model.new_cache(batch, total, dtype=cache_dtype)

    def cached(next_ids, tokens, step):
        return model(next_ids[:, None], cache=cache, logits_to_keep=1)[:, -1]

    first = model(input_ids, cache=cache, logits_to_keep=1)[:, -1]
    return decode_loop(first, cached, input_ids, max_new_tokens, sampling)
