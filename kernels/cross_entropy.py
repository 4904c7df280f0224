"""Fused LM-head + cross-entropy, computed in chunks of tokens.

The full ``(tokens, vocab)`` logits never exist: each chunk computes its logits, its loss and - when
a gradient is wanted - its softmax gradient right away (``softmax - onehot``), then folds that into
the gradients of the hidden states and of the head weight. Same FLOPs as ``lm_head`` + ``F.cross_entropy``
but one pass over each logit block instead of four (logits, log-softmax, its backward, NLL backward),
and memory bounded by ``chunk_size × vocab`` (the idea of Liger's FusedLinearCrossEntropy and of
Apple's cut-cross-entropy).
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100


def capped_logits(raw: torch.Tensor, softcap: float | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(cap · tanh(raw / cap), d logits / d raw = 1 − tanh²)`` of one chunk; uncapped: ``(raw, None)``.
    The fused losses multiply their logit gradient by the derivative, so a soft-capped head (Gemma 2's
    ``final_logit_softcapping``) trains through the same chunks."""
    if softcap is None:
        return raw, None
    tanh = torch.tanh(raw / softcap)
    return tanh * softcap, 1.0 - tanh.square()


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index: int, chunk_size: int, softcap: float | None):
        want_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        valid_all = targets != ignore_index
        acc_dtype = _at_least_fp32(hidden).dtype
        n_valid = valid_all.sum().clamp(min=1).to(acc_dtype)
        total = torch.zeros((), dtype=acc_dtype, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if want_grad else None
        grad_weight = torch.zeros_like(weight, dtype=acc_dtype) if want_grad else None
        for start in range(0, hidden.shape[0], chunk_size):
            h = hidden[start : start + chunk_size]
            t = targets[start : start + chunk_size]
            valid = valid_all[start : start + chunk_size]
            logits, slope = capped_logits(_at_least_fp32(h @ weight.t()), softcap)
            lse = torch.logsumexp(logits, dim=-1)
            rows = torch.arange(t.shape[0], device=t.device)
            safe_t = t.clamp(min=0)
            target_logit = logits[rows, safe_t]
            total += ((lse - target_logit) * valid).sum()
            if want_grad:
                grad_logits = logits.sub_(lse.unsqueeze(1)).exp_()  # softmax, in place
                grad_logits[rows, safe_t] -= 1.0
                grad_logits.mul_((valid.to(acc_dtype) / n_valid).unsqueeze(1))
                if slope is not None:
                    grad_logits.mul_(slope)
                grad_hidden[start : start + chunk_size] = grad_logits.to(hidden.dtype) @ weight
                grad_weight.addmm_(grad_logits.t(), _at_least_fp32(h))
        if want_grad:
            ctx.save_for_backward(grad_hidden, grad_weight.to(weight.dtype))
        return total / n_valid

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, grad_weight = ctx.saved_tensors
        return grad_hidden * grad_output, grad_weight * grad_output, None, None, None, None


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    ignore_index: int = IGNORE_INDEX,
    chunk_size: int = 1024,
    softcap: float | None = None,
) -> torch.Tensor:
    """Mean cross-entropy of ``hidden @ weight.T`` against ``targets`` (``ignore_index`` rows skipped).

    ``hidden`` (..., d), ``weight`` (vocab, d), ``targets`` (...). Differentiable in ``hidden`` and ``weight``.
    ``softcap`` c: the logits are ``c · tanh(hidden @ weight.T / c)`` (a soft-capped LM head).
    """
    check_softcap(softcap)
    if hidden.shape[:-1] != targets.shape:
        raise ValueError(
            f"hidden {tuple(hidden.shape)} and targets {tuple(targets.shape)} must agree on leading dims"
        )
    if chunk_size <= 0:
        raise ValueError(f"chunk_size={chunk_size} must be positive")
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    cap = None if softcap is None else float(softcap)
    return _LinearCrossEntropy.apply(flat_hidden, weight, targets.reshape(-1), ignore_index, chunk_size, cap)


def check_softcap(softcap: float | None, name: str = "softcap") -> None:
    if softcap is not None and not softcap > 0:
        raise ValueError(f"{name}={softcap!r} must be a positive number (the logit cap) or None")


# Evaluation's logit block: 64 MiB of float32 (256 rows of a 65,536-token vocabulary, 64 of Gemma's 262,144).
TOKEN_NLL_BLOCK_BYTES = 64 * 2**20


@torch.no_grad()
def token_nll(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    softcap: float | None = None,
    block_bytes: int = TOKEN_NLL_BLOCK_BYTES,
) -> torch.Tensor:
    """Per-token NLL ``logsumexp(z) − z[target]`` of ``z = hidden @ weight.T`` (soft-capped by
    ``softcap``), of shape ``targets.shape``, in float32 (float64 for float64 inputs); no gradient.

    The logits are computed one block of at most ``block_bytes`` of float32 at a time: a block is a
    chunk of rows and, when a single row is over budget, a slice of the vocabulary whose log-sum-exp is
    folded into a running one. Memory is O(block) whatever the vocabulary and the number of tokens -
    evaluation's counterpart of :func:`linear_cross_entropy`."""
    check_softcap(softcap)
    if hidden.shape[:-1] != targets.shape:
        raise ValueError(
            f"hidden {tuple(hidden.shape)} and targets {tuple(targets.shape)} must agree on leading dims"
        )
    vocab = weight.shape[0]
    flat_hidden, flat_targets = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    if flat_targets.numel() and not 0 <= int(flat_targets.min()) <= int(flat_targets.max()) < vocab:
        raise ValueError(f"targets must be token ids in 0..{vocab - 1}")
    budget = max(1, block_bytes // 4)  # float32 elements per block
    rows_per_block = max(1, min(flat_hidden.shape[0], budget // vocab))
    columns = max(1, min(vocab, budget // rows_per_block))
    acc_dtype = _at_least_fp32(flat_hidden[:0]).dtype
    out = torch.empty(flat_targets.shape, dtype=acc_dtype, device=hidden.device)
    for start in range(0, flat_hidden.shape[0], rows_per_block):
        h = flat_hidden[start : start + rows_per_block]
        t = flat_targets[start : start + rows_per_block]
        lse = target_logit = torch.empty(t.shape, dtype=acc_dtype, device=h.device)
        for first in range(0, vocab, columns):
            logits, _ = capped_logits(_at_least_fp32(h @ weight[first : first + columns].t()), softcap)
            lse = (
                torch.logaddexp(lse, torch.logsumexp(logits, dim=-1))
                if first
                else torch.logsumexp(logits, -1)
            )
            inside = (t >= first) & (t < first + logits.shape[1])
            picked = logits.gather(1, (t - first).clamp(0, logits.shape[1] - 1).unsqueeze(1)).squeeze(1)
            target_logit = torch.where(inside, picked, target_logit)
        out[start : start + rows_per_block] = lse - target_logit
    return out.reshape(targets.shape)
