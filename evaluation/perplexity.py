"""Perplexity with sliding windows, at one context length or over a ladder of them.

Built on :func:`kvforge.arch.evaluate.windowed_nll` (the data README's procedure when
``stride == context``). Perplexity versus context length shows where a sliding-window or compressed
form starts to lose: a window-W model matches its global source up to W tokens of context and
departs from it beyond.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from kvforge.arch import CausalLM
from kvforge.arch.evaluate import windowed_nll
from kvforge.evaluation.schema import documented

from .corpus import Corpus


@dataclass
class PerplexityRow:
    corpus: str = documented("name of the evaluated text (its file name without suffix)")
    context: int = documented("window length in tokens: one forward pass sees at most this many tokens")
    stride: int = documented(
        "step between window starts; when smaller than `context` the windows overlap and each one "
        "scores only its last `stride` targets, so every target after the first window has at least "
        "`context - stride` tokens of context"
    )
    n_tokens: int = documented("tokens of the corpus evaluated (its first `n_tokens`)")
    n_tokens_available: int = documented(
        "tokens in the whole corpus; larger than `n_tokens` when max_tokens cut it"
    )
    n_predicted: int = documented("targets scored (`n_tokens - 1`: the first token is never predicted)")
    nll: float = documented("mean next-token negative log-likelihood, nats per predicted token")
    perplexity: float = documented("exp(nll)")


def check_context(model: CausalLM, context: int, what: str = "context") -> None:
    limit = model.config.max_seq_len
    if not 1 <= context <= limit:
        raise ValueError(
            f"{what}={context} is outside 1..{limit}: the model supports at most max_seq_len={limit} "
            "positions (max_position_embeddings)"
        )


def perplexity(
    model: CausalLM, corpus: Corpus, context: int, stride: int | None = None, batch_size: int = 8
) -> PerplexityRow:
    """Mean NLL of ``corpus`` read in ``context``-token windows every ``stride`` tokens."""
    check_context(model, context)
    stride = stride or context
    if not 1 <= stride <= context:
        raise ValueError(f"stride={stride} must be in 1..context={context}")
    result = windowed_nll(model, corpus.ids, window=context, stride=stride, batch_size=batch_size)
    return PerplexityRow(
        corpus=corpus.name,
        context=context,
        stride=stride,
        n_tokens=corpus.ids.numel(),
        n_tokens_available=corpus.n_available,
        n_predicted=result.n_predicted,
        nll=result.mean,
        perplexity=result.perplexity,
    )


def default_contexts(max_seq_len: int, smallest: int = 128) -> list[int]:
    """Powers of two from ``smallest`` up to, and always including, ``max_seq_len``."""
    contexts = [2**k for k in range(int(math.log2(max(1, smallest))), int(math.log2(max_seq_len)) + 1)]
    contexts = [c for c in contexts if c < max_seq_len]
    return [*contexts, max_seq_len]


def perplexity_vs_context(
    model: CausalLM,
    corpus: Corpus,
    contexts: list[int],
    stride_fraction: float = 1.0,
    batch_size: int = 8,
) -> list[PerplexityRow]:
    """One :func:`perplexity` row per context length; each window advances by
    ``stride_fraction · context`` (1.0 = non-overlapping windows)."""
    if not 0 < stride_fraction <= 1:
        raise ValueError(f"stride_fraction={stride_fraction} must be in (0, 1]")
    for context in contexts:
        check_context(model, context, "contexts")
    return [
        perplexity(model, corpus, context, max(1, round(context * stride_fraction)), batch_size)
        for context in contexts
    ]
