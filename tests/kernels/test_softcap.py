"""Soft-capping (Gemma 2): attention-logit capping is applied by the backends that can (eager, flex),
``auto`` routes soft-capped calls to them, every other backend refuses by name; the fused LM-head
losses cap the logits per chunk with exact values and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers.models.gemma2.modeling_gemma2 import eager_attention_forward

from kvforge.kernels.attention import BackendUnavailable, attention, resolve_backend
from kvforge.kernels.cross_entropy import IGNORE_INDEX, linear_cross_entropy
from kvforge.kernels.distillation import linear_distillation_loss

CAP = 0.7  # small enough that tanh bends most of these scores
SCALE = 0.3


def _qkv(q_len=9, k_len=9, seed=0):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(2, q_len, 4, 8, generator=generator)
    k = torch.randn(2, k_len, 2, 8, generator=generator)
    v = torch.randn(2, k_len, 2, 8, generator=generator)
    return q, k, v


class _Module(torch.nn.Module):  # what transformers' attention function reads from its module
    num_key_value_groups = 2


def _transformers_reference(q, k, v, window=None):
    q_len, k_len = q.shape[1], k.shape[1]
    query = torch.arange(q_len).unsqueeze(1) + k_len - q_len
    key = torch.arange(k_len).unsqueeze(0)
    keep = (key <= query) & ((key > query - window) if window else True)
    mask = torch.zeros(q_len, k_len).masked_fill(~keep, float("-inf"))
    out, _ = eager_attention_forward(
        _Module().eval(),
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        mask,
        scaling=SCALE,
        softcap=CAP,
    )
    return out


@pytest.mark.parametrize("window", [None, 4])
def test_eager_softcap_equals_transformers_gemma2_attention(window):
    q, k, v = _qkv()
    actual = attention(q, k, v, window=window, scale=SCALE, softcap=CAP, backend="eager")
    uncapped = attention(q, k, v, window=window, scale=SCALE, backend="eager")
    expected = _transformers_reference(q, k, v, window)
    assert torch.allclose(actual, expected, atol=1e-6)
    assert not torch.allclose(uncapped, expected, atol=1e-3)  # the cap matters for these scores


@pytest.mark.parametrize(
    ("q_len", "window", "kv_lens"),
    [(9, None, None), (9, 4, None), (3, None, None), (1, 4, torch.tensor([6, 9]))],
    ids=["causal", "window", "prefix", "decode-static"],
)
def test_flex_softcap_equals_eager(q_len, window, kv_lens):
    q, k, v = _qkv(q_len=q_len)
    kwargs = dict(window=window, scale=SCALE, softcap=CAP, kv_lens=kv_lens)
    expected = attention(q, k, v, backend="eager", **kwargs)
    assert torch.allclose(attention(q, k, v, backend="flex", **kwargs), expected, atol=1e-5)


@pytest.mark.parametrize("backend", ["sdpa", "sdpa-math", "flash", "triton"])
def test_backends_without_softcap_refuse_by_name(backend):
    q, k, v = _qkv(q_len=1)
    with pytest.raises(
        BackendUnavailable, match=rf"backend='{backend}' cannot apply attention-logit soft-capping"
    ):
        attention(q, k, v, scale=SCALE, softcap=CAP, backend=backend)


def test_auto_routes_softcapped_calls_to_a_backend_that_caps():
    q, k, v = _qkv()
    assert resolve_backend("auto", q, k=k, v=v) == "sdpa"  # the CPU table's choice without a cap
    assert resolve_backend("auto", q, k=k, v=v, softcap=CAP) == "eager"
    expected = attention(q, k, v, scale=SCALE, softcap=CAP, backend="eager")
    assert torch.equal(attention(q, k, v, scale=SCALE, softcap=CAP), expected)


def test_non_positive_softcap_is_refused():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r"softcap=0.0 must be a positive number"):
        attention(q, k, v, softcap=0.0)


# ------------------------------------------------------------------------------ fused losses
def _capped(logits, cap):
    return logits if cap is None else torch.tanh(logits / cap) * cap


def _head_inputs(seed=0, vocab=37, d=16):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(3, 11, d, generator=generator).mul_(2).requires_grad_()
    weight = torch.randn(vocab, d, generator=generator).requires_grad_()
    targets = torch.randint(0, vocab, (3, 11), generator=generator)
    targets[0, :4] = IGNORE_INDEX
    return hidden, weight, targets


def test_fused_cross_entropy_with_a_softcap_equals_capped_logits_reference():
    hidden, weight, targets = _head_inputs()
    fused = linear_cross_entropy(hidden, weight, targets, chunk_size=8, softcap=2.0)
    grads = torch.autograd.grad(fused, (hidden, weight))
    logits = _capped(hidden.reshape(-1, 16) @ weight.t(), 2.0)
    reference = F.cross_entropy(logits, targets.reshape(-1), ignore_index=IGNORE_INDEX)
    expected = torch.autograd.grad(reference, (hidden, weight))
    assert torch.allclose(fused, reference, atol=1e-5)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(grads, expected))
    uncapped = linear_cross_entropy(hidden, weight, targets, chunk_size=8)
    assert not torch.allclose(uncapped, reference, atol=1e-2)


@pytest.mark.parametrize(("softcap", "teacher_softcap"), [(2.0, None), (None, 1.5), (2.0, 1.5)])
def test_fused_distillation_caps_each_head_as_its_model_does(softcap, teacher_softcap):
    hidden, weight, targets = _head_inputs()
    teacher_hidden, teacher_weight, _ = _head_inputs(seed=1)
    teacher_hidden = teacher_hidden.detach()
    loss, ce, kl = linear_distillation_loss(
        hidden,
        weight,
        teacher_hidden,
        teacher_weight.detach(),
        targets,
        alpha=0.3,
        temperature=2.0,
        chunk_size=8,
        softcap=softcap,
        teacher_softcap=teacher_softcap,
    )
    grads = torch.autograd.grad(loss, (hidden, weight))
    student = _capped(hidden.reshape(-1, 16) @ weight.t(), softcap)
    teacher = _capped(teacher_hidden.reshape(-1, 16) @ teacher_weight.detach().t(), teacher_softcap)
    flat = targets.reshape(-1)
    ref_ce = F.cross_entropy(student, flat, ignore_index=IGNORE_INDEX)
    log_q, log_p = F.log_softmax(student / 2.0, -1), F.log_softmax(teacher / 2.0, -1)
    ref_kl = (log_p.exp() * (log_p - log_q)).sum(-1)[flat != IGNORE_INDEX].mean()
    reference = 0.3 * ref_ce + 0.7 * 4.0 * ref_kl
    expected = torch.autograd.grad(reference, (hidden, weight))
    assert torch.allclose(ce, ref_ce, atol=1e-5) and torch.allclose(kl, ref_kl, atol=1e-5)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(grads, expected))
