"""Every form learns: gradients reach every parameter and a few steps lower the loss."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kvforge.arch import CausalLM
from kvforge.arch.presets import PRESETS
from tests.conftest import tiny_form


def _loss(model, ids):
    logits = model(ids[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


@pytest.mark.parametrize("form", PRESETS)
def test_gradients_reach_every_parameter(form):
    model = CausalLM(
        tiny_form(form, q_lora_rank=16 if form == "mla" else None, qk_norm=True, attention_bias=True)
    )
    _loss(model, torch.randint(0, 97, (2, 16))).backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not missing


@pytest.mark.parametrize("form", PRESETS)
def test_a_few_steps_lower_the_loss_on_a_fixed_batch(form):
    model = CausalLM(tiny_form(form))
    ids = torch.randint(0, 97, (4, 24))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = _loss(model, ids).item()
    for _ in range(15):
        optimizer.zero_grad()
        loss = _loss(model, ids)
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.8 * first


def test_tied_embeddings_share_one_tensor():
    model = CausalLM(tiny_form("gqa", tie_embeddings=True))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    untied = CausalLM(tiny_form("gqa"))
    assert model.num_parameters() == untied.num_parameters() - 97 * 64


def test_gradient_checkpointing_gives_the_same_gradients():
    model = CausalLM(tiny_form("mix"))
    ids = torch.randint(0, 97, (2, 12))
    _loss(model, ids).backward()
    reference = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.model.gradient_checkpointing = True
    _loss(model, ids).backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, reference[name], rtol=1e-5, atol=1e-6)
