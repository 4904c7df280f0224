"""AdamW groups and learning-rate schedules, checked against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from kvforge.arch import CausalLM
from kvforge.training.optim import LRSchedule, OptimizerConfig, build_optimizer, decay_groups
from tests.training.helpers import tiny_config


def test_cosine_schedule_warms_up_then_follows_the_cosine():
    schedule = LRSchedule("cosine", warmup_steps=4, total_steps=14, min_lr_ratio=0.1, decay_fraction=0.2)
    assert [schedule(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert schedule(4) == pytest.approx(1.0)
    assert schedule(9) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert schedule(14) == pytest.approx(0.1)
    assert schedule(100) == pytest.approx(0.1)


def test_wsd_schedule_is_flat_then_decays_linearly_over_the_last_fraction():
    schedule = LRSchedule("wsd", warmup_steps=2, total_steps=20, min_lr_ratio=0.0, decay_fraction=0.25)
    assert schedule(1) == 1.0 and schedule(14) == 1.0  # decay starts at 20 - 5 = 15
    assert schedule(15) == 1.0
    assert schedule(17) == pytest.approx(1 - 2 / 5)
    assert schedule(20) == pytest.approx(0.0)


def test_constant_schedule_needs_no_step_count():
    optimizer, scheduler = build_optimizer(
        torch.nn.Linear(2, 2), OptimizerConfig(schedule="constant", warmup_steps=0), None
    )
    for _ in range(3):
        optimizer.step()
        scheduler.step()
    assert scheduler.get_last_lr() == [OptimizerConfig().lr] * 2


def test_decay_applies_to_linear_weights_only():
    model = CausalLM(tiny_config(attention_bias=True, tie_embeddings=True))
    decay, no_decay = decay_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    kept = {names[id(p)] for p in no_decay["params"]}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert "model.layers.0.self_attn.q_proj.weight" in decayed
    assert "model.layers.0.mlp.down_proj.weight" in decayed
    assert {"model.embed_tokens.weight", "model.norm.weight", "model.layers.0.self_attn.q_proj.bias"} <= kept
    assert not decayed & kept
    assert len(decayed) + len(kept) == len(list(model.parameters()))


def test_a_decaying_schedule_without_a_step_count_is_refused():
    with pytest.raises(ValueError, match=r"trainer\.max_steps or optim\.total_steps"):
        build_optimizer(torch.nn.Linear(2, 2), OptimizerConfig(), None)


@pytest.mark.parametrize("field, value", [("schedule", "linear"), ("lr", 0.0), ("min_lr_ratio", 2.0)])
def test_bad_optimizer_options_name_the_field(field, value):
    with pytest.raises(ValueError, match=f"optim.{field}"):
        OptimizerConfig(**{field: value})
