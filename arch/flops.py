"""Training FLOPs per token from the config alone, per attention form (for MFU).

Counting convention (PaLM, Chowdhery et al. 2022, appendix B), one multiply-add = 2 FLOPs:

    forward per token = 2 · (weights of every matmul the token passes through)
                      + 2 · Σ_layers n_heads · (d_qk + d_v) · context
    training          = 3 · forward            (backward ≈ 2 × forward)

- matmul weights: attention projections of the layer's form, SwiGLU (3 · d_model · ffn_dim) and the LM
  head (d_model · vocab); the embedding lookup, norms, RoPE and softmax are not counted.
- ``context`` is the full ``seq_len`` for a global layer (the causal mask is *not* discounted, as in
  PaLM and in the 6·N + 12·L·d·T figure of GPU.md, so MFU numbers compare) and ``min(window, seq_len)``
  for a sliding-window layer.
- GQA/MQA/MHA: q_proj + o_proj, plus k_proj + v_proj unless the layer reads another layer's K/V
  (``kv_from``). MLA (expanded form, as trained): q_proj (or q_a + q_b), kv_a_proj_with_mqa unless
  ``kv_from``, kv_b_proj (it expands every token's latent, shared or not) and o_proj; scores use
  d_qk = qk_nope_head_dim + qk_rope_head_dim and values v_head_dim.

For a dense MHA model this reduces to the familiar 6·N + 12·n_layers·d_model·seq_len.
"""

from __future__ import annotations

from .config import LayerSpec, ModelConfig


def _attention_weights(config: ModelConfig, spec: LayerSpec) -> int:
    """Matmul weights one token passes through in this layer's attention block."""
    d, heads = config.d_model, config.n_heads
    if spec.attention in ("mla", "gla"):
        qk_dim = config.qk_nope_head_dim + config.qk_rope_head_dim
        if config.q_lora_rank is None:
            query = d * heads * qk_dim
        else:
            query = d * config.q_lora_rank + config.q_lora_rank * heads * qk_dim
        latent = (
            0
            if spec.kv_from is not None
            else d * (config.kv_lora_rank + config.mla_rope_heads * config.qk_rope_head_dim)
        )
        up_width = config.kv_lora_rank // (spec.n_latent_heads or 1)
        expand = up_width * heads * (config.qk_nope_head_dim + config.v_head_dim)
        return query + latent + expand + heads * config.v_head_dim * d
    q_and_o = 2 * d * heads * config.head_dim
    if spec.attention == "deltanet":  # + g_proj (output gate) and the two scalar gates per state head
        return q_and_o + d * heads * config.head_dim + 2 * d * spec.n_kv_heads * (config.head_dim + 1)
    if spec.attention == "linear":  # + the feature maps of queries and keys
        features = spec.feature_dim or config.head_dim
        return q_and_o + 2 * d * spec.n_kv_heads * config.head_dim + 2 * heads * config.head_dim * features
    if spec.attention == "gta":  # tied states + a shared rotary key of half a head
        return q_and_o + (0 if spec.kv_from is not None else d * (spec.n_kv_heads + 0.5) * config.head_dim)
    k_and_v = 0 if spec.kv_from is not None else 2 * d * spec.n_kv_heads * config.head_dim
    return q_and_o + k_and_v


def _score_width(config: ModelConfig, spec: LayerSpec) -> int:
    """d_qk + d_v summed over the query heads: multiply-adds per attended key per token (for a
    constant-state layer: its window only; the state costs a fixed amount, counted in :func:`_state_work`)."""
    if spec.attention in ("mla", "gla"):
        return config.n_heads * (config.qk_nope_head_dim + config.qk_rope_head_dim + config.v_head_dim)
    return config.n_heads * 2 * config.head_dim


def _state_work(config: ModelConfig, spec: LayerSpec) -> int:
    """Multiply-adds per token of a constant-state layer's recurrence: read and write a ``d_k × d_v`` state
    per head (deltanet: the delta rule reads it twice; linear: ``2F × d_v`` sums per query head)."""
    if spec.attention == "deltanet":
        return 3 * config.n_heads * config.head_dim * config.head_dim
    features = 2 * (spec.feature_dim or config.head_dim)
    return 2 * config.n_heads * features * (config.head_dim + 1)


def forward_flops_per_token(config: ModelConfig, seq_len: int) -> int:
    """Forward-pass FLOPs per token of a ``seq_len``-token training sequence."""
    if seq_len <= 0:
        raise ValueError(f"flops_per_token: seq_len={seq_len} must be positive")
    multiply_adds = config.d_model * config.vocab_size  # LM head
    for spec in config.layers:
        context = seq_len if spec.window is None else min(spec.window, seq_len)
        if spec.attention in ("linear", "deltanet"):
            context = min(spec.window or 0, seq_len)
            multiply_adds += _state_work(config, spec)
        multiply_adds += _attention_weights(config, spec)
        multiply_adds += 3 * config.d_model * config.ffn_dim
        multiply_adds += _score_width(config, spec) * context
    return 2 * multiply_adds


def flops_per_token(config: ModelConfig, seq_len: int) -> int:
    """Training (forward + backward) FLOPs per token: 3 × :func:`forward_flops_per_token`."""
    return 3 * forward_flops_per_token(config, seq_len)
