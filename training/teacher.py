"""The distillation teacher: frozen, in the run's compute dtype (bf16 under bf16 precisions, never an fp32
copy), no gradients and no optimizer state. Under FSDP2 it is sharded on the student's mesh like the
student (``fully_shard`` per decoder layer, then the root), resharding after every forward, so each
rank holds ``1 / world`` of it plus one gathered layer at a time.

The loss reads the teacher's final hidden states (``CausalLM.hidden_states``) and its LM head weight,
not its logits: :func:`kvforge.kernels.distillation.linear_distillation_loss` applies both heads one
chunk of tokens at a time.
"""

from __future__ import annotations

import torch

from kvforge.arch import CausalLM, ModelConfig

from .fsdp import load_full_state, shard_frozen


def cast_parameters_(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Parameters to ``dtype`` in place; buffers (the RoPE frequencies) keep float32."""
    for param in model.parameters():
        param.data = param.data.to(dtype)
    return model


def build_teacher(
    config: ModelConfig,
    state_dict: dict[str, torch.Tensor] | None,
    dtype: torch.dtype,
    device: torch.device,
    mesh=None,
) -> CausalLM:
    """The frozen teacher on ``device`` in ``dtype``. With a ``mesh`` (FSDP2) it is built on the meta device,
    sharded, and ``state_dict`` - needed on global rank 0 only, ignored elsewhere - is broadcast into
    the shards."""
    if mesh is None:
        teacher = CausalLM(config)
        teacher.load_state_dict(state_dict)
        teacher = cast_parameters_(teacher, dtype).to(device)
    else:
        with torch.device("meta"):
            teacher = cast_parameters_(CausalLM(config), dtype)
        shard_frozen(teacher, mesh)
        teacher.to_empty(device=device)
        teacher.init_weights()  # RoPE tables; the weights come next
        load_full_state(teacher, state_dict)
    return teacher.requires_grad_(False).eval()


@torch.no_grad()
def teacher_head_inputs(
    teacher: CausalLM, input_ids: torch.Tensor, document_ids: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(final hidden states (batch, seq, d), LM head weight (vocab, d))`` of the teacher; under FSDP2 the
    head weight is gathered for this step only."""
    hidden = teacher.hidden_states(input_ids, document_ids=document_ids)
    weight = teacher.lm_head.weight
    if hasattr(weight, "full_tensor"):  # a DTensor shard: gather it
        weight = weight.full_tensor()
    return hidden, weight
