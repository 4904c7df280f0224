"""Fused LM heads + distillation loss, computed in chunks of tokens.

    loss = α · CE(student, targets) + (1 − α) · T² · KL_T

(Hinton, Vinyals & Dean 2015; ``kvforge.training.distill`` explains the terms.) Like
:mod:`kvforge.kernels.cross_entropy`, each chunk of rows computes its student and teacher logits from
the final hidden states, its loss terms and - when a gradient is wanted - its logit gradient right
away, folds that into the gradients of the student's hidden states and head weight, and frees the
chunk: the full ``(tokens, vocab)`` logits of neither model ever exist, and the temporaries are a few
``chunk_size × vocab`` float32 blocks (:data:`LOGIT_BLOCKS`).

Logit gradients, per scored row, with ``z = s / T``, ``q = softmax(z)``, ``p = softmax(t / T)``:
- CE: ``softmax(s) − onehot(target)``
- forward KL(p ‖ q): ``(q − p) / T``
- reverse KL(q ‖ p): ``q ⊙ (log q − log p − KL) / T``
"""

from __future__ import annotations

import torch

from .cross_entropy import IGNORE_INDEX, _at_least_fp32, capped_logits, check_softcap

# float32 (chunk × vocab) blocks alive at once at the peak of one chunk: student logits (reused for the
# CE softmax), teacher log-probabilities (in place), student log-probabilities, one distribution and one
# difference. The memory estimate (kvforge.arch.memory) counts these.
LOGIT_BLOCKS = 5


def _chunk(s, t, y, valid, temperature: float, reverse: bool, want_grad: bool):
    """``(Σ CE, Σ KL, d(α-free terms)/ds as (ce_grad, kl_grad))`` of one chunk; ``s``/``t`` are consumed."""
    rows = torch.arange(y.shape[0], device=y.device)
    safe_y = y.clamp(min=0)
    lse = torch.logsumexp(s, dim=-1, keepdim=True)
    ce_sum = ((lse.squeeze(1) - s[rows, safe_y]) * valid).sum()
    log_p = t.div_(temperature)
    log_p.sub_(torch.logsumexp(log_p, dim=-1, keepdim=True))
    log_q = s / temperature
    log_q.sub_(torch.logsumexp(log_q, dim=-1, keepdim=True))
    if reverse:
        q = log_q.exp()
        diff = log_q - log_p
        kl_rows = torch.einsum("rv,rv->r", q, diff)  # no (rows × vocab) product tensor
        kl_grad = diff.sub_(kl_rows.unsqueeze(1)).mul_(q).div_(temperature) if want_grad else None
    else:
        p = log_p.exp()
        diff = log_p - log_q
        kl_rows = torch.einsum("rv,rv->r", p, diff)
        del diff
        kl_grad = log_q.exp_().sub_(p).div_(temperature) if want_grad else None
    kl_sum = (kl_rows * valid).sum()
    ce_grad = None
    if want_grad:
        ce_grad = s.sub_(lse).exp_()  # softmax, in place
        ce_grad[rows, safe_y] -= 1.0
    return ce_sum, kl_sum, ce_grad, kl_grad


class _LinearDistillation(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        hidden,
        weight,
        teacher_hidden,
        teacher_weight,
        targets,
        alpha,
        temperature,
        reverse,
        chunk_size,
        softcap,
        teacher_softcap,
    ):
        want_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        valid_all = targets != IGNORE_INDEX
        acc_dtype = _at_least_fp32(hidden).dtype
        n_valid = valid_all.sum().clamp(min=1).to(acc_dtype)
        sums = torch.zeros(2, dtype=acc_dtype, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if want_grad else None
        grad_weight = torch.zeros_like(weight, dtype=acc_dtype) if want_grad else None
        kl_scale = (1 - alpha) * temperature**2
        for start in range(0, hidden.shape[0], chunk_size):
            rows = slice(start, start + chunk_size)
            h, valid = hidden[rows], valid_all[rows].to(acc_dtype)
            s, slope = capped_logits(_at_least_fp32(h @ weight.t()).to(acc_dtype), softcap)
            t_raw = _at_least_fp32(teacher_hidden[rows] @ teacher_weight.t()).to(acc_dtype)
            t, _ = capped_logits(t_raw, teacher_softcap)
            ce_sum, kl_sum, ce_grad, kl_grad = _chunk(
                s, t, targets[rows], valid, temperature, reverse, want_grad
            )
            sums += torch.stack((ce_sum, kl_sum))
            if want_grad:
                grad_logits = ce_grad.mul_(alpha).add_(kl_grad, alpha=kl_scale)
                del kl_grad
                grad_logits.mul_((valid / n_valid).unsqueeze(1))
                if slope is not None:
                    grad_logits.mul_(slope)
                grad_hidden[rows] = grad_logits.to(hidden.dtype) @ weight
                grad_weight.addmm_(grad_logits.t(), _at_least_fp32(h).to(acc_dtype))
        ce, kl = sums / n_valid
        if want_grad:
            ctx.save_for_backward(grad_hidden, grad_weight.to(weight.dtype))
        ctx.mark_non_differentiable(ce, kl)
        return alpha * ce + kl_scale * kl, ce, kl

    @staticmethod
    def backward(ctx, grad_loss, _grad_ce, _grad_kl):
        grad_hidden, grad_weight = ctx.saved_tensors
        return (grad_hidden * grad_loss, grad_weight * grad_loss, *([None] * 10))


def linear_distillation_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    alpha: float = 0.5,
    temperature: float = 1.0,
    reverse: bool = False,
    chunk_size: int = 1024,
    softcap: float | None = None,
    teacher_softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(loss, ce, kl)`` of the student ``hidden @ weight.T`` distilled from ``teacher_hidden @
    teacher_weight.T`` against ``targets`` (``IGNORE_INDEX`` rows skipped); ``kl`` is the unscaled KL at
    temperature T (forward KL(teacher ‖ student), or reverse with ``reverse=True``).

    ``hidden`` (..., d), ``weight`` (vocab, d), ``teacher_hidden`` (..., d_teacher), ``teacher_weight``
    (vocab, d_teacher), ``targets`` (...). ``loss`` is differentiable in ``hidden`` and ``weight``; the
    teacher gets no gradient, ``ce`` and ``kl`` are for logging. ``softcap`` / ``teacher_softcap``: each
    head's final-logit soft-cap (``c · tanh(logits / c)``, Gemma 2), applied per chunk; None = uncapped.
    """
    check_softcap(softcap)
    check_softcap(teacher_softcap, "teacher_softcap")
    if hidden.shape[:-1] != targets.shape or teacher_hidden.shape[:-1] != targets.shape:
        raise ValueError(
            f"hidden {tuple(hidden.shape)}, teacher_hidden {tuple(teacher_hidden.shape)} and targets "
            f"{tuple(targets.shape)} must agree on leading dims"
        )
    if weight.shape[0] != teacher_weight.shape[0]:
        raise ValueError(
            f"student vocabulary {weight.shape[0]} and teacher vocabulary {teacher_weight.shape[0]} differ: "
            "the KL compares next-token distributions over one vocabulary"
        )
    if chunk_size <= 0:
        raise ValueError(f"chunk_size={chunk_size} must be positive")
    return _LinearDistillation.apply(
        hidden.reshape(-1, hidden.shape[-1]),
        weight,
        teacher_hidden.detach().reshape(-1, teacher_hidden.shape[-1]),
        teacher_weight.detach(),
        targets.reshape(-1),
        float(alpha),
        float(temperature),
        bool(reverse),
        chunk_size,
        None if softcap is None else float(softcap),
        None if teacher_softcap is None else float(teacher_softcap),
    )
