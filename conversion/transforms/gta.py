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

from .calibration import check_calibration
from .common import Sink, StateDict, attn_prefix, check_gqa_source
from .record import Transform
from .stages import MeasuredStage, run_stage
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


def to_gta(
    config: ModelConfig,
    state_dict: StateDict,
    calibration: torch.Tensor | None = None,
    *,
    device: str | torch.device = "cpu",
    sink: Sink | None = None,
) -> tuple[ModelConfig, StateDict]:
    """GTA with one tied state per source K/V head (chain :func:`to_gqa` first for fewer groups).
    ``calibration`` sets the input covariance of the tying fit (without it: the weights alone).
    One layer at a time: ``device`` runs the calibration stream (the fits stay on the host, in
    float64); ``sink`` receives the output layer by layer (default: the returned dict)."""
    target = gta_config(config)
    calibration = check_calibration(calibration, config, "to_gta")
    return target, run_stage(config, state_dict, _GTAStage(config, calibration, device), target, sink)


class _GTAStage(MeasuredStage):
    """Per layer: the input covariance on the source model (calibration stream through the source
    layers), then the tying of :func:`tie_layer`."""

    def measure(self, layer: torch.nn.Module, inputs: list[torch.Tensor]) -> torch.Tensor:
        xs = torch.cat([x.reshape(-1, x.shape[-1]) for x in inputs]).double()
        return (xs.mT @ xs / xs.shape[0]).cpu()

    def convert(self, index: int, tensors: StateDict, gram: torch.Tensor | None) -> StateDict:
        return tie_layer(self.config, index, tensors, gram)


def tie_layer(config: ModelConfig, index: int, tensors: StateDict, gram: torch.Tensor | None) -> StateDict:
    """Layer ``index``'s tensors with its attention made GTA (``gram``: its input covariance, or None)."""
    prefix, n_kv_heads = attn_prefix(index), config.layers[index].n_kv_heads
    n_heads, head_dim = config.n_heads, config.head_dim
    rotary, plain = rotary_and_plain_rows(head_dim)
    out = dict(tensors)
    dtype = tensors[f"{prefix}q_proj.weight"].dtype
    w_q = out.pop(f"{prefix}q_proj.weight").view(n_heads, head_dim, -1)
    w_k = out.pop(f"{prefix}k_proj.weight").view(n_kv_heads, head_dim, -1)
    w_v = out.pop(f"{prefix}v_proj.weight").view(n_kv_heads, head_dim, -1)
    w_o = out.pop(f"{prefix}o_proj.weight").view(-1, n_heads, head_dim).double()
    ties = [tie_group(w_k[g], w_v[g], gram) for g in range(n_kv_heads)]
    group = n_heads // n_kv_heads
    o_new = torch.stack([w_o[:, h] @ ties[h // group][2] for h in range(n_heads)], dim=1)
    new = {
        "q_proj.weight": torch.cat((w_q[:, plain], w_q[:, rotary]), dim=1).reshape(n_heads * head_dim, -1),
        "kv_proj.weight": torch.cat([tie[1] for tie in ties]),
        "k_rope_proj.weight": torch.stack([tie[0] for tie in ties]).mean(0),
        "o_proj.weight": o_new.reshape(o_new.shape[0], -1),
    }
    out.update({prefix + name: tensor.to(dtype) for name, tensor in new.items()})
    return out


# ---------------------------------------------------------------------------------------------- record
@dataclasses.dataclass(kw_only=True)
class GTAOptions:
    """None: one tied state per K/V head of the source."""


GTA = Transform(
    "gta",
    to_gta,
    GTAOptions,
    check=lambda config, o: gta_config(config),
    summary="grouped-tied attention: one tied K/V state per group plus one shared rotary key",
    calibrates=True,
)
