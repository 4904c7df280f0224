"""Memory estimates: exact parameter counts, activations close to what autograd really saves."""

from __future__ import annotations

import pytest
import torch

from kvforge.arch import CausalLM, ModelConfig
from kvforge.arch.memory import (
    CE_LOGIT_BLOCKS,
    count_parameters,
    estimate_inference_memory,
    estimate_training_memory,
    root_parameters,
)
from kvforge.arch.presets import PRESETS, with_form
from kvforge.kernels.distillation import LOGIT_BLOCKS
from tests.conftest import tiny_form


@pytest.mark.parametrize(
    "variant",
    [
        {},
        {"tie_embeddings": True},
        {"qk_norm": True, "attention_bias": True},
        {"attention_bias": True, "o_proj_bias": True},
        {"q_lora_rank": 12},
    ],
)
@pytest.mark.parametrize("form", PRESETS)
def test_parameter_count_is_exact(form, variant):
    config = tiny_form(form, **variant)
    assert count_parameters(config) == CausalLM(config).num_parameters()


def _saved_activation_bytes(model: CausalLM, ids: torch.Tensor) -> int:
    """Bytes of the distinct non-parameter tensors autograd saves during the forward pass."""
    saved: dict[int, int] = {}

    def pack(tensor):
        saved[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model.loss(ids[:, :-1], ids[:, 1:])
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    return sum(size for ptr, size in saved.items() if ptr not in params)


@pytest.mark.parametrize("form", ["mha", "gqa", "mla", "cla", "mix"])
def test_activation_estimate_is_within_20_percent_of_measured(form):
    base = ModelConfig(vocab_size=64, d_model=128, n_layers=4, n_heads=8, max_seq_len=512, ffn_dim=352)
    config = with_form(base, form, window=512)  # windows as long as the sequence: same saved tensors
    ids = torch.randint(0, 64, (2, 257))
    measured = _saved_activation_bytes(CausalLM(config), ids)
    estimate = estimate_training_memory(config, batch=2, seq_len=256).activations
    assert 0.8 * measured <= estimate <= 1.2 * measured


@pytest.mark.parametrize("form", ["gqa", "mla"])
def test_activation_estimate_under_bf16_autocast_is_within_20_percent_of_measured(form):
    base = ModelConfig(vocab_size=64, d_model=128, n_layers=4, n_heads=8, max_seq_len=512, ffn_dim=352)
    config = with_form(base, form, window=512)
    ids = torch.randint(0, 64, (2, 257))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        measured = _saved_activation_bytes(CausalLM(config), ids)
    estimate = estimate_training_memory(config, batch=2, seq_len=256, activation_dtype="bf16").activations
    assert 0.8 * measured <= estimate <= 1.2 * measured


def test_checkpointing_and_sharding_shrink_the_estimate():
    config = tiny_form("gqa")
    full = estimate_training_memory(config, 8, 64)
    checkpointed = estimate_training_memory(config, 8, 64, gradient_checkpointing=True)
    sharded = estimate_training_memory(config, 8, 64, shards=4)
    assert checkpointed.activations < full.activations
    assert sharded.optimizer == full.optimizer // 4
    assert full.optimizer == 2 * full.parameters  # AdamW keeps two moments


def test_suggestion_names_the_dominant_term():
    config = tiny_form("gqa")
    assert "micro-batch" in estimate_training_memory(config, 512, 64).suggestion()
    assert "KV cache" not in estimate_training_memory(config, 1, 4).suggestion()
    assert "context" in estimate_inference_memory(config, 256, 64).suggestion()


def test_bad_arguments_name_allowed_values():
    with pytest.raises(ValueError, match="optimizer='lion'"):
        estimate_training_memory(tiny_form("gqa"), 1, 8, optimizer="lion")


def test_teacher_is_counted_in_the_compute_dtype_and_sharded_like_the_student():
    config, teacher = tiny_form("gqa"), tiny_form("mha")
    alone = estimate_training_memory(config, 2, 64, activation_dtype="bf16")
    one = estimate_training_memory(config, 2, 64, activation_dtype="bf16", teacher=teacher)
    two = estimate_training_memory(config, 2, 64, activation_dtype="bf16", teacher=teacher, shards=2)
    hidden = 2 * 64 * teacher.d_model * 2
    assert alone.teacher == 0
    assert one.teacher == count_parameters(teacher) * 2 + hidden  # bf16, not the fp32 of the student
    gathered_head = teacher.vocab_size * teacher.d_model * 2
    assert two.teacher == count_parameters(teacher) * 2 // 2 + hidden + gathered_head


def test_distillation_holds_more_logit_blocks_than_cross_entropy():
    config = tiny_form("gqa")
    ce = estimate_training_memory(config, 4, 64, loss_chunk=32)
    kd = estimate_training_memory(config, 4, 64, loss_chunk=32, teacher=config)
    assert kd.loss - ce.loss == (LOGIT_BLOCKS - CE_LOGIT_BLOCKS) * 32 * config.vocab_size * 4


def test_fsdp2_counts_the_gathered_root_and_layers_and_runtime_adds_to_the_total():
    config = tiny_form("gqa")
    single = estimate_training_memory(config, 2, 64)
    sharded = estimate_training_memory(config, 2, 64, shards=4)
    layer = count_parameters(config, layer_index=0)
    assert single.gathered == 0
    assert sharded.gathered == (root_parameters(config) + 2 * layer) * 4 + layer * 4
    assert count_parameters(config) == root_parameters(config) + sum(
        count_parameters(config, layer_index=i) for i in range(config.n_layers)
    )
    sharded.runtime = 1000
    assert sharded.total == sharded.training + 1000
