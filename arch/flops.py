"""Training FLOPs per token from the config alone, per attention form (for MFU).

Counting convention (PaLM, Chowdhery et al. 2022, appendix B), one multiply-add = 2 FLOPs:

    forward per token = 2 · (weights of every matmul the token passes through)
                      + 2 · Σ_layers n_heads · (d_qk + d_v) · context
    training          = 3 · forward            (backward ≈ 2 × forward)

- matmul weights: attention projections of the layer's form (its record's ``projection_weights`` in
  :mod:`.forms`; scores are its ``mixing_multiply_adds``), SwiGLU (3 · d_model · ffn_dim) and the LM
  head (d_model · vocab); the embedding lookup, norms, RoPE and softmax are not counted.
- ``context`` is the full ``seq_len`` for a global layer (the causal mask is *not* discounted, as in
  PaLM and in the 6·N + 12·L·d·T figure of GPU.md, so MFU numbers compare) and ``min(window, seq_len)``
  for a sliding-window layer.
- each form's facts say which of its projections a layer that reads another layer's K/V (``kv_from``)
  skips, and which widths its scores and values have (e.g. MLA's expanded form, as trained).

For a dense MHA model this reduces to the familiar 6·N + 12·n_layers·d_model·seq_len.
"""

from __future__ import annotations

from .config import ModelConfig
from .forms import form_of


def forward_flops_per_token(config: ModelConfig, seq_len: int) -> int:
    """Forward-pass FLOPs per token of a ``seq_len``-token training sequence."""
    if seq_len <= 0:
        raise ValueError(f"flops_per_token: seq_len={seq_len} must be positive")
    multiply_adds = config.d_model * config.vocab_size  # LM head
    for spec in config.layers:
        context = seq_len if spec.window is None else min(spec.window, seq_len)
        form = form_of(spec)
        multiply_adds += form.projection_weights(config, spec)
        multiply_adds += 3 * config.d_model * config.ffn_dim
        multiply_adds += form.mixing_multiply_adds(config, spec, context)
    return 2 * multiply_adds


def flops_per_token(config: ModelConfig, seq_len: int) -> int:
    """Training (forward + backward) FLOPs per token: 3 × :func:`forward_flops_per_token`."""
    return 3 * forward_flops_per_token(config, seq_len)
