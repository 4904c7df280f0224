"""MHA/GQA → grouped-tied attention (GTA, :mod:`kvforge.arch.attention_gta`), one tied state per
source K/V head.

The algebra, per K/V group ``g`` with key rows ``W_k`` and value rows ``W_v`` (``head_dim = d``):

1. *RoPE split.* In the rotate-half layout pair ``j`` (dims ``j, j + d/2``) turns at ``θ^(-2j/d)``.
   The even pairs ``j = 2i`` turn at ``θ^(-4i/d)``, exactly the frequencies of a ``d/2``-dim rotary
   table: they become GTA's rotary half, unchanged for the queries. The odd pairs lose RoPE: they
   become the no-RoPE half ``k_nope = W_kn x`` (the one approximation in the scores).
2. *One rotary key.* GTA shares one rotary key across groups: ``k_rope_proj`` = the mean over groups
   of their even-pair rows (exact when the groups' rotary keys agree).
3. *Tying.* The tied state is ``s = [k_nope ; s₂]``, so the keys' no-RoPE half is kept exactly, and
   ``s₂`` (``d/2`` dims) carries what the value needs beyond ``k_nope``: with the calibration input
   covariance ``Σ`` (identity without calibration), ``D₁ = W_v Σ W_knᵀ (W_kn Σ W_knᵀ)⁻¹`` regresses
   the value on ``k_nope``, the residual rows are ``E = W_v - D₁ W_kn``, and ``s₂ = Uᵀ E x`` with
   ``U`` the top ``d/2`` principal directions of the residual ``E Σ Eᵀ``. Then ``v ≈ D s`` with
   ``D = [D₁ | U]``, and ``D`` folds into ``o_proj`` (``O_h ← O_h D`` for every query head ``h``
   of the group): GTA's value is the tied state itself.

The value is exact when ``W_v`` lies in ``span(W_kn) + d/2`` more directions; tests check the whole
conversion is exact on such a source. Biases and q/k norms are refused (the tied state is linear).
"""

from __future__ import annotations

import dataclasses

import torch

from kvforge.arch import ModelConfig
from kvforge.arch.model import rotary_key

from .calibration import LayerStream, build_model, check_calibration, rope_tables
from .common import StateDict, attn_prefix, check_gqa_source, copy_state_dict
from .whitening import Whitening


def gta_config(config: ModelConfig) -> ModelConfig:
    """The target config of :func:`to_gta` (validates the source on the config alone)."""
    check_gqa_source(config, "to_gta")
    if config.head_dim % 4:
        raise ValueError(
            f"to_gta: head_dim={config.head_dim} must be a multiple of 4 (half of it stays rotary, in pairs)"
        )
    for name in ("attention_bias", "qk_norm"):
        if getattr(config, name):
            raise ValueError(
                f"to_gta: {name}=True is not supported; the tied K/V state is a plain linear map"
            )
    if config.rope_scaling is not None and config.rope_scaling.type == "yarn":
        raise ValueError(
            "to_gta: rope_scaling.type='yarn' depends on the rotary width, so a half-width table would "
            "turn at other frequencies (allowed: none, linear, llama3)"
        )
    layers = []
    for index, spec in enumerate(config.layers):
        if spec.kv_from is not None or not spec.rope:
            raise ValueError(
                f"to_gta: layer {index} {'reads shared K/V' if spec.kv_from is not None else 'is NoPE'}; "
                "to_gta converts layers that own RoPE'd K/V"
            )
        layers.append(dataclasses.replace(spec, attention="gta"))
    return dataclasses.replace(config, layers=layers, pattern=None)


def rotary_and_plain_rows(head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of a rotate-half head that stay rotary (even pairs, as a half-width rotate-half head)
    and rows that become no-RoPE (odd pairs)."""
    half, quarter = head_dim // 2, head_dim // 4
    even = torch.arange(quarter) * 2
    return torch.cat((even, even + half)), torch.cat((even + 1, even + 1 + half))


def tie_group(
    w_k: torch.Tensor, w_v: torch.Tensor, gram: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One group: its rotary key rows, tied-state rows ``(d, D)`` and value map ``D`` ``(d, d)`` with
    ``W_v x ≈ D s`` (module docstring, steps 1 and 3). float64."""
    head_dim = w_k.shape[0]
    rotary, plain = rotary_and_plain_rows(head_dim)
    w_kn = w_k[plain].double()
    w_v = w_v.double()
    whitening = Whitening.identity(w_k.shape[1]) if gram is None else Whitening.from_gram(gram)
    kn_white, v_white = whitening.rows_to_white(w_kn), whitening.rows_to_white(w_v)
    d1 = torch.linalg.lstsq(kn_white.mT, v_white.mT).solution.mT  # (d, d/2): v ≈ D₁ k_nope
    residual = w_v - d1 @ w_kn
    u, _, _ = torch.linalg.svd(whitening.rows_to_white(residual), full_matrices=False)
    u = u[:, : head_dim // 2]
    tied = torch.cat((w_kn, u.mT @ residual))
    return w_k[rotary].double(), tied, torch.cat((d1, u), dim=1)


@torch.no_grad()
def input_grams(config: ModelConfig, state_dict: StateDict, calibration: torch.Tensor) -> list[torch.Tensor]:
    """``E[x xᵀ]`` of every layer's attention input on the source model (float64)."""
    model = build_model(config, state_dict)
    stream = LayerStream(model.config, model.model.embed_tokens.weight, calibration)
    ropes = rope_tables(config, calibration.shape[1])
    grams = []
    for layer in model.model.layers:
        xs = torch.cat([x.reshape(-1, x.shape[-1]) for x in stream.attention_inputs(layer)]).double()
        grams.append(xs.mT @ xs / xs.shape[0])
        stream.advance(layer, ropes[rotary_key(config, layer.spec)])
    return grams


def to_gta(
    config: ModelConfig, state_dict: StateDict, calibration: torch.Tensor | None = None
) -> tuple[ModelConfig, StateDict]:
    """GTA with one tied state per source K/V head (chain :func:`to_gqa` first for fewer groups).
    ``calibration`` sets the input covariance of the tying fit (without it: the weights alone)."""
    target = gta_config(config)
    calibration = check_calibration(calibration, config, "to_gta")
    grams = input_grams(config, state_dict, calibration) if calibration is not None else None
    out = copy_state_dict(state_dict)
    n_heads, head_dim = config.n_heads, config.head_dim
    rotary, plain = rotary_and_plain_rows(head_dim)
    for index, spec in enumerate(config.layers):
        prefix = attn_prefix(index)
        dtype = state_dict[f"{prefix}q_proj.weight"].dtype
        w_q = out.pop(f"{prefix}q_proj.weight").view(n_heads, head_dim, -1)
        w_k = out.pop(f"{prefix}k_proj.weight").view(spec.n_kv_heads, head_dim, -1)
        w_v = out.pop(f"{prefix}v_proj.weight").view(spec.n_kv_heads, head_dim, -1)
        w_o = out.pop(f"{prefix}o_proj.weight").view(-1, n_heads, head_dim).double()
        ties = [
            tie_group(w_k[g], w_v[g], None if grams is None else grams[index]) for g in range(spec.n_kv_heads)
        ]
        group = n_heads // spec.n_kv_heads
        o_new = torch.stack([w_o[:, h] @ ties[h // group][2] for h in range(n_heads)], dim=1)
        new = {
            "q_proj.weight": torch.cat((w_q[:, plain], w_q[:, rotary]), dim=1).reshape(
                n_heads * head_dim, -1
            ),
            "kv_proj.weight": torch.cat([tie[1] for tie in ties]),
            "k_rope_proj.weight": torch.stack([tie[0] for tie in ties]).mean(0),
            "o_proj.weight": o_new.reshape(o_new.shape[0], -1),
        }
        out.update({prefix + name: tensor.to(dtype) for name, tensor in new.items()})
    return target, out
