"""Language-model loss over a long token stream, cut into windows.

With ``stride=None`` this is the loss procedure of the README's results (the shared data's own README
states it): consecutive non-overlapping
windows, inputs ``ids[s:s+W]`` and targets ``ids[s+1:s+W+1]`` for s = 0, W, 2W, …, each run from
position 0, summed NLL divided by the number of predicted tokens. With a ``stride`` < ``window`` the
windows overlap and only the last ``stride`` targets of each window are scored, so every token after
the first window is predicted with at least ``window - stride`` tokens of context (the usual
"sliding-window perplexity").

The logits are never materialised: the model stops at its final hidden states and the LM head + NLL
run one bounded block at a time on the scored positions only (:func:`kvforge.kernels.cross_entropy.token_nll`),
so memory is the model, one batch's activations and a 64 MiB logit block, whatever the vocabulary
(a batch of 8 × 512 full float32 logits of Gemma 3's 262,144-token vocabulary would be 4.3 GB).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kvforge.kernels.cross_entropy import token_nll

from .model import CausalLM


@dataclass
class NLLResult:
    total_nll: float
    n_predicted: int

    @property
    def mean(self) -> float:
        return self.total_nll / self.n_predicted

    @property
    def perplexity(self) -> float:
        try:
            return math.exp(self.mean)
        except OverflowError:  # a mean NLL above ~709 nats: a broken model, still a result
            return math.inf


@torch.no_grad()
def windowed_nll(
    model: CausalLM,
    ids: torch.Tensor,
    window: int = 512,
    stride: int | None = None,
    batch_size: int = 8,
) -> NLLResult:
    """Summed next-token NLL of the 1-D token stream ``ids`` and the number of tokens predicted."""
    ids = ids.flatten()
    if ids.numel() < 2:
        raise ValueError(f"need at least 2 tokens to predict one, got {ids.numel()}")
    if window <= 0 or window > model.config.max_seq_len:
        raise ValueError(f"window={window} must be in 1..max_seq_len={model.config.max_seq_len}")
    stride = stride or window
    if not 0 < stride <= window:
        raise ValueError(f"stride={stride} must be in 1..window={window}")
    device = model.model.embed_tokens.weight.device
    n_targets = ids.numel() - 1
    # (input start, first scored target index within the window)
    spans = [(0, 0)]
    while spans[-1][0] + window < n_targets:
        start = spans[-1][0] + stride
        spans.append((start, window - stride))
    total, counted = 0.0, 0
    was_training = model.training
    model.eval()
    for first in range(0, len(spans), batch_size):
        batch_nll, batch_count = _score(
            model, ids, spans[first : first + batch_size], window, n_targets, device
        )
        total += batch_nll
        counted += batch_count
    model.train(was_training)
    return NLLResult(total, counted)


def _score(model, ids, spans, window, n_targets, device) -> tuple[float, int]:
    """NLL of a group of windows; windows of equal length (all but the last) run as one batch."""
    total, counted = 0.0, 0
    lengths = {min(window, n_targets - start) for start, _ in spans}
    for length in lengths:
        rows = [(start, skip) for start, skip in spans if min(window, n_targets - start) == length]
        inputs = torch.stack([ids[s : s + length] for s, _ in rows]).to(device)
        hidden = model.hidden_states(inputs)
        # only the scored positions reach the head: (targets, d_model), their ids alongside
        scored = torch.cat([hidden[row, skip:] for row, (_, skip) in enumerate(rows)])
        targets = torch.cat([ids[s + 1 + skip : s + 1 + length] for s, skip in rows]).to(device)
        nll = token_nll(scored, model.lm_head.weight, targets, softcap=model.config.final_logit_softcap)
        total += nll.double().sum().item()
        counted += targets.numel()
    return total, counted
