"""Tiny random Hugging Face checkpoints, shared by the benchmarks and the tests
(``tests/conversion/hf_tiny.py`` builds every family's variant on these sizes).

Norm weights and biases are randomised too: transformers initialises them to one and zero, which would
hide a mix-up of norms or biases.
"""

from __future__ import annotations

import torch

VOCAB = 101
SIZES = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=8,
    max_position_embeddings=64,
    rms_norm_eps=1e-5,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=None,
)


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter drawn afresh (in place): norm weights 1 + 0.2·N(0,1), biases 0.1·N, the rest 0.08·N."""
    generator = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        noise = torch.randn(param.shape, generator=generator)
        if name.endswith("norm.weight"):
            param.copy_(1 + 0.2 * noise)
        elif name.endswith(".bias"):
            param.copy_(0.1 * noise)
        else:
            param.copy_(0.08 * noise)
    return model
