"""MLA (or MHA/GQA, through :func:`.to_mla`) → grouped-latent attention (GLA,
:mod:`kvforge.arch.attention_gla`) at the same cache width: the ``kv_lora_rank`` latent becomes
``n_latent_heads`` latent heads of ``r = kv_lora_rank / n_latent_heads``, each read by one group of
query heads.

Per layer and group ``g`` with up-projection rows ``W_g`` (its heads' slice of ``kv_b_proj``) and
latent covariance ``E[c cᵀ] = L Lᵀ`` (calibration; ``L = I`` without it): the group keeps the
``r``-dim subspace of the latent that its heads need most - reduced-rank regression,
``W_g L = U S Vᵀ``, latent head ``c_g = V_rᵀ L⁻¹ c`` and ``kv_b_proj_g = W_g L V_r`` - so
``kv_b_proj_g c_g`` is the best rank-``r`` approximation of ``W_g c``. The projection is folded into
``kv_a_proj_with_mqa``'s latent rows (through the source norm weight), the rotary key is unchanged.
The source normalises the whole latent and GLA each latent head, so each head's norm weight is the
least-squares constant ``ρ_g`` with ``ρ_g · u/rms(u) ≈ c_g`` on calibration (``u`` the pre-norm head);
without calibration ``ρ_g`` assumes isotropic latents. Exact when every group's ``W_g`` has rank
``≤ r`` and the source has no latent norm (``mla_latent_norm=False``).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch

from kvforge.arch import ModelConfig
from kvforge.arch.attention_mla import MLA_NORM_EPS

from .calibration import check_calibration
from .common import Sink, StateDict, attn_prefix, is_count, map_layers
from .mla import check_mla_options, to_mla
from .mla_rope import STRATEGIES
from .record import Transform, option
from .stages import MeasuredStage, StageSink
from .whitening import Whitening


def gla_config(config: ModelConfig, *, n_latent_heads: int, **mla_options) -> ModelConfig:
    """The GLA config of an MLA ``config`` (an MHA/GQA one is first checked for :func:`to_mla`)."""
    forms = config.forms
    if forms == {"gqa"}:
        check_mla_options(config, **mla_options)
        rank = mla_options.get("kv_lora_rank")
    elif forms == {"mla"}:
        if mla_options:
            raise ValueError(
                f"to_gla: options {sorted(mla_options)} are for MHA/GQA sources; this one is MLA"
            )
        rank = config.kv_lora_rank
    else:
        raise ValueError(
            f"to_gla: the source has {sorted(forms)} layers; to_gla converts all-MLA or all-MHA/GQA models"
        )
    if (
        not is_count(n_latent_heads)
        or n_latent_heads < 1
        or config.n_heads % n_latent_heads
        or rank % n_latent_heads
    ):
        raise ValueError(
            f"to_gla: n_latent_heads={n_latent_heads!r} must divide n_heads={config.n_heads} and "
            f"kv_lora_rank={rank}"
        )
    if forms == {"mla"}:
        if config.mla_rope_heads != 1:
            raise ValueError(
                f"to_gla: mla_rope_heads={config.mla_rope_heads}; GLA shares one rotary key (allowed: 1)"
            )
        for index, spec in enumerate(config.layers):
            if spec.kv_from is not None:
                raise ValueError(
                    f"to_gla: layer {index} reads layer {spec.kv_from}'s latent; convert before sharing"
                )
        layers = [
            dataclasses.replace(s, attention="gla", n_latent_heads=n_latent_heads) for s in config.layers
        ]
        # GLA's per-head norms are fitted in their normalising regime, at DeepSeek's eps (see _split_layer)
        return dataclasses.replace(config, layers=layers, pattern=None, mla_latent_norm_eps=MLA_NORM_EPS)
    return config


class _GLAStage(MeasuredStage):
    """Per layer of an MLA model: its latents on calibration (the stream through the MLA layers
    before it), then :func:`_split_layer`."""

    def __init__(
        self, config: ModelConfig, target: ModelConfig, calibration: torch.Tensor | None, device
    ) -> None:
        super().__init__(config, calibration, device)
        self.target = target

    def measure(self, layer: torch.nn.Module, inputs: list[torch.Tensor]):
        return _latents(layer, inputs)

    def convert(self, index: int, tensors: StateDict, latents) -> StateDict:
        dtype = tensors[f"{attn_prefix(index)}kv_b_proj.weight"].dtype
        new = _split_layer(self.config, self.target, tensors, index, latents)
        return {**tensors, **{name: tensor.to(dtype) for name, tensor in new.items()}}


def _latents(layer: torch.nn.Module, inputs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The pre-norm latent rows ``a`` (``kv_a`` latent part, no norm) and the source's normalised
    latent ``c`` over the calibration tokens (float64, on the host)."""
    attn = layer.self_attn
    raw = torch.cat([attn.kv_a_proj_with_mqa(x)[..., : attn.kv_lora_rank].flatten(0, 1) for x in inputs])
    normed = attn.kv_a_layernorm(raw) if attn.kv_a_layernorm is not None else raw
    return raw.double().cpu(), normed.double().cpu()


def _split_layer(config, target, state_dict, index, latents) -> dict[str, torch.Tensor]:
    prefix = attn_prefix(index)
    rank = config.kv_lora_rank
    n_latent = target.layers[index].n_latent_heads
    r = rank // n_latent
    w_b = state_dict[f"{prefix}kv_b_proj.weight"].double()  # (heads·(nope+v), rank)
    w_a = state_dict[f"{prefix}kv_a_proj_with_mqa.weight"].double()
    norm_key = f"{prefix}kv_a_layernorm.weight"
    scale = state_dict[norm_key].double() if norm_key in state_dict else torch.ones(rank, dtype=torch.float64)
    if latents is None:
        whitening = Whitening.identity(rank)
    else:
        normed = latents[1]
        whitening = Whitening.from_gram(normed.mT @ normed / normed.shape[0])
    lower = whitening.R.mT  # E[c cᵀ] = L Lᵀ with L = Rᵀ
    bias_key = f"{prefix}kv_a_proj_with_mqa.bias"
    bias = state_dict[bias_key].double() if bias_key in state_dict else None
    rows_b, rows_a, biases, norms = [], [], [], []
    for w_g in w_b.view(n_latent, -1, rank):
        _, _, vh = torch.linalg.svd(w_g @ lower, full_matrices=False)
        basis = vh[:r].mT  # V_r
        project = basis.mT @ whitening.R_inv.mT  # P_g = V_rᵀ L⁻¹ on the normalised latent
        rows_b.append(w_g @ lower @ basis)
        rows_a.append(project @ (scale.unsqueeze(1) * w_a[:rank]))
        if bias is not None:
            biases.append(project @ (scale * bias[:rank]))
        if norm_key not in state_dict:
            continue
        if latents is None:  # isotropic unit latent: rms(P_g (w ⊙ c_raw)) ≈ ‖P_g diag(w)‖_F / √r
            norms.append((project * scale).norm() / r**0.5 * torch.ones(r, dtype=torch.float64))
            continue
        raw, normed = latents
        pre = (raw * scale) @ project.mT
        # The fit treats GLA's norm as u/rms(u); at unit rms its eps (1e-6) is negligible, whatever scale the
        # source latent had (an MLA in the linear regime has it tiny, or large with a raised eps).
        size = pre.square().mean().sqrt().clamp_min(1e-300)
        rows_a[-1] = rows_a[-1] / size
        if bias is not None:
            biases[-1] = biases[-1] / size
        unit = pre / pre.square().mean(-1, keepdim=True).sqrt().clamp_min(1e-12)
        wanted = normed @ project.mT
        norms.append(((unit * wanted).sum() / unit.square().sum()) * torch.ones(r, dtype=torch.float64))
    new = {
        f"{prefix}kv_b_proj.weight": torch.cat(rows_b),
        f"{prefix}kv_a_proj_with_mqa.weight": torch.cat((torch.cat(rows_a), w_a[rank:])),
    }
    if norms:
        new[norm_key] = torch.cat(norms)
    if bias is not None:
        new[bias_key] = torch.cat((*biases, bias[rank:]))
    return new


def to_gla(
    config: ModelConfig,
    state_dict: StateDict,
    calibration: torch.Tensor | None = None,
    *,
    n_latent_heads: int,
    progress: bool = False,
    device: str | torch.device = "cpu",
    sink: Sink | None = None,
    **mla_options,
) -> tuple[ModelConfig, StateDict]:
    """GLA with ``n_latent_heads`` latent heads. An MHA/GQA source goes through :func:`to_mla` first
    (``mla_options``: its ``kv_lora_rank``, ``rope_dims``, ...; the DeepSeek layout, one rotary key),
    whose layers are split as they come out. One layer at a time: ``device`` runs the calibration
    streams (and to_mla's fits); ``sink`` receives the output layer by layer (default: the returned dict)."""
    gla_config(config, n_latent_heads=n_latent_heads, **mla_options)
    calibration = check_calibration(calibration, config, "to_gla")

    def make(mla: ModelConfig) -> tuple[_GLAStage, ModelConfig]:
        target = gla_config(mla, n_latent_heads=n_latent_heads)
        return _GLAStage(mla, target, calibration, device), target

    staged = StageSink(make, sink)
    if config.forms == {"gqa"}:
        to_mla(config, state_dict, calibration, **mla_options, progress=progress, device=device, sink=staged)
    else:
        map_layers(config, state_dict, [[index] for index in range(config.n_layers)], dict, staged)
    return staged.target, staged.result()


# ---------------------------------------------------------------------------------------------- record
@dataclasses.dataclass(kw_only=True)
class GLAOptions:
    """Grouped-latent attention: MLA's latent in heads, each read by one group of query heads."""

    n_latent_heads: int = option(help="latent heads splitting kv_lora_rank")
    # An MHA/GQA source goes through to_mla first: its options (None: to_mla's default; an MLA source
    # takes none of them).
    kv_lora_rank: int | None = option(None, help="to_mla's latent width (an MHA/GQA source needs it)")
    rope_dims: int | None = option(None, help="to_mla's rotary dims (an MHA/GQA source needs them)")
    rope_selection: Literal[STRATEGIES] | None = option(None, help="to_mla's choice of rotary pairs")


GLA = Transform("gla", to_gla, GLAOptions, gla_config, calibrates=True)
