"""Token generation with the explicit KV cache: one prefill, then one token per step."""

from __future__ import annotations

import torch

from .model import CausalLM


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


@torch.no_grad()
def generate(
    model: CausalLM,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | None = None,
    use_cache: bool = True,
    cache_dtype: torch.dtype | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Prompt + continuation ``(batch, prompt + new)``. Rows that emit ``eos_token_id`` keep emitting it;
    generation stops early once every row has. ``use_cache=False`` recomputes the whole prefix each step
    (the reference that cached decoding is tested against)."""
    if max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be positive")
    batch, prompt_len = input_ids.shape
    total = prompt_len + max_new_tokens
    if total > model.config.max_seq_len:
        raise ValueError(
            f"prompt ({prompt_len}) + max_new_tokens ({max_new_tokens}) = {total} exceeds the model's "
            f"max_seq_len={model.config.max_seq_len}"
        )
    cache = model.new_cache(batch, total, dtype=cache_dtype) if use_cache else None
    tokens = input_ids
    step_input = input_ids
    finished = torch.zeros(batch, dtype=torch.bool, device=input_ids.device)
    for _ in range(max_new_tokens):
        logits = model(step_input if use_cache else tokens, cache=cache, logits_to_keep=1)[:, -1]
        next_ids = sample_next(logits, temperature, top_k, top_p, generator)
        if eos_token_id is not None:
            next_ids = torch.where(finished, torch.full_like(next_ids, eos_token_id), next_ids)
            finished |= next_ids == eos_token_id
        tokens = torch.cat((tokens, next_ids[:, None]), dim=1)
        step_input = next_ids[:, None]
        if eos_token_id is not None and bool(finished.all()):
            break
    return tokens
