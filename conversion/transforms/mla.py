"""MHA/GQA → multi-head latent attention (DeepSeek-V2/V3), from the source weights (+ calibration).

Per layer:

1. **Rotary part.** A few frequency pairs stay rotary (:mod:`.mla_rope` picks them, as a
   progression DeepseekV3 can express). In the ``deepseek`` layout the rotary key is one key
   shared by every head, so the heads' keys of each kept pair are merged into their best common
   complex key (per-head complex scale folded into ``q_pe``, :func:`.merge.merge_keys`); the
   ``kvforge`` layout keeps one rotary key per source K/V head (``mla_rope_heads``), exactly.
2. **Position-free part.** The other pairs lose their rotation; each head's query pair is multiplied
   by the complex factor that best replaces ``exp(1j·ω·Δ)`` under the source attention.
3. **Latent.** The position-free keys and the values of all heads are factored jointly: the latent
   spans the top principal subspace (whitened inputs) of ``[S_h K_h ; O_h V_h]_h``, where ``S_h``
   turns a key error into a score error (the head's query covariance, times the energy of the
   head's output so that score and output errors are in one currency) and ``O_h`` is the head's
   slice of ``o_proj``. ``kv_b_proj`` holds the least-squares coefficients of every head's key and
   value on the latent.
4. **Latent RMSNorm** (``deepseek`` layout; stock DeepseekV3 always has ``kv_a_layernorm``). Default
   (``latent_norm="linear"``): the latent stays in the norm's eps-dominated regime, where
   ``RMSNorm(c) = c/√(eps + ms(c))`` is a constant scale (exact to ``LINEAR_MARGIN``). kvforge's model
   keeps the latent rows at the source key rows' scale and raises the eps instead
   (``mla_latent_norm_eps``; ``RMSNorm(s·c; eps·s²) = RMSNorm(c; eps)``), so the weights train; a stock
   export scales the rows back to DeepSeek's 1e-6. ``flatten``/``weight``: the norm is *calibrated*:
   its weight is the least-squares constant ``ρ`` with ``ρ·c/rms(c) ≈ c`` (``flatten`` first picks the
   latent basis where ``rms(c)`` varies least), see :mod:`.latent_norm`.
5. With calibration, ``o_proj`` is refitted by least squares (and optionally refined) against the
   source block's outputs, through the real MLA module (norm included), see :mod:`.layerwise`.

``layout="kvforge"`` with every pair kept and full rank is lossless (per-head rotary keys, no latent
norm): the bound the tests check.

Qwen2 biases go through exactly (rows act on ``[x, 1]``; value bias → ``o_proj``'s bias, position-free
key bias dropped as softmax-invariant, rotary key bias → ``kv_a_proj_with_mqa``'s bias, query bias →
``q_proj``'s bias, ``mla_q_bias``: kvforge-typed). Qwen3 q/k norms are replaced by linear stand-ins
(approximate, :func:`.qk_norm.linearised`).
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Literal

import torch

from kvforge.arch import LayerSpec, ModelConfig
from kvforge.arch.attention_mla import MLA_NORM_EPS
from kvforge.arch.model import rotary_key

from .calibration import LayerStream, check_calibration, rope_tables, source_layer
from .common import EMBEDDINGS, Sink, StateDict, check_gqa_source
from .key_metric import centered_output_energy, centered_readout, to_metric, white_mean
from .latent_norm import LINEAR_EPS, LatentNorm, fit_latent_norm, key_scale, linear_regime_scale
from .layerwise import FitOptions, LayerContext, convert_attention, new_attention
from .merge import merge_keys
from .mla_rope import (
    STRATEGIES,
    RopeStatistics,
    check_exportable,
    exported_theta,
    rope_statistics,
    select_pairs,
    weight_scores,
)
from .qk_norm import linearised
from .record import FittedOptions, Transform, option
from .rotary import as_pairs, from_pairs, pair_frequencies
from .whitening import flat_inputs, head_targets, layer_whitening, rows_with_bias, split_bias

LAYOUTS = ("deepseek", "kvforge")
# How the deepseek layout treats kv_a_layernorm: "linear" scales the latent into the norm's eps-dominated
# regime (exact up to LINEAR_MARGIN); "flatten" picks the latent basis in which rms(c) varies least on
# calibration and fits the weight; "weight" fits only the weight.
LATENT_NORMS = ("linear", "flatten", "weight")


@dataclass
class MLAReport:
    """What :func:`to_mla` chose and what the DeepseekV3 layout costs, per layer."""

    pairs: list[int] = field(default_factory=list)  # kept rotary source pairs
    theta: float = 0.0  # the exported rope_theta
    rotary_residual: dict[int, float] = field(
        default_factory=dict
    )  # shared-key error / key energy (kept pairs)
    latent_norm: dict[int, LatentNorm] = field(default_factory=dict)  # rms spread before/after calibration


@dataclass
class MLAPlan:
    pairs: list[int]  # kept rotary source pairs; slot p of the rotary key holds pair pairs[p]
    theta: float
    layout: str
    statistics: dict[int, RopeStatistics]
    rotary_residual: bool = True  # carry what the shared rotary key misses in the latent
    latent_norm: str = "linear"  # see LATENT_NORMS
    report: MLAReport | None = None

    @property
    def carries_residual(self) -> bool:
        return self.layout == "deepseek" and self.rotary_residual

    def free_pairs(self, n_pairs: int) -> list[int]:
        return [pair for pair in range(n_pairs) if pair not in self.pairs]


def check_mla_options(
    config: ModelConfig,
    *,
    kv_lora_rank: int,
    rope_dims: int,
    rope_selection: str = "contribution",
    layout: str = "deepseek",
    rotary_residual: bool = True,
    latent_norm: str = "linear",
) -> None:
    """Validate :func:`to_mla`'s options against the source config (no weights needed)."""
    _check_source(config)
    if layout not in LAYOUTS:
        raise ValueError(f"to_mla: layout={layout!r}: allowed values are {list(LAYOUTS)}")
    if latent_norm not in LATENT_NORMS:
        raise ValueError(f"to_mla: latent_norm={latent_norm!r}: allowed values are {list(LATENT_NORMS)}")
    if rope_selection not in STRATEGIES:
        raise ValueError(f"to_mla: rope_selection={rope_selection!r}: allowed values are {list(STRATEGIES)}")
    head_dim = config.head_dim
    if (
        isinstance(rope_dims, bool)
        or not isinstance(rope_dims, int)
        or not 2 <= rope_dims <= head_dim
        or rope_dims % 2
    ):
        raise ValueError(
            f"to_mla: rope_dims={rope_dims} must be an even number of rotary dims in 2..head_dim={head_dim}"
        )
    n_kv = {spec.n_kv_heads for spec in config.layers}
    if layout == "kvforge" and len(n_kv) != 1:
        raise ValueError(
            f"to_mla: layout='kvforge' needs the same n_kv_heads on every layer (got {sorted(n_kv)})"
        )
    max_rank = max_latent_rank(config, rope_dims, layout, rotary_residual)
    if (
        isinstance(kv_lora_rank, bool)
        or not isinstance(kv_lora_rank, int)
        or not 1 <= kv_lora_rank <= max_rank
    ):
        raise ValueError(
            f"to_mla: kv_lora_rank={kv_lora_rank} must be in 1..{max_rank}: the latent cannot exceed d_model="
            f"{config.d_model} nor the position-free key + value dims of the {max(n_kv)} K/V heads it replaces"
        )


def max_latent_rank(config: ModelConfig, rope_dims: int, layout: str, rotary_residual: bool = True) -> int:
    """Largest useful ``kv_lora_rank``: beyond it the latent has nothing left to hold."""
    nope_dims = config.head_dim if layout == "deepseek" and rotary_residual else config.head_dim - rope_dims
    n_kv = max(spec.n_kv_heads for spec in config.layers)
    return min(config.d_model, n_kv * (config.head_dim + nope_dims))


def to_mla(
    config: ModelConfig,
    state_dict: StateDict,
    calibration: torch.Tensor | None = None,
    *,
    kv_lora_rank: int,
    rope_dims: int,
    rope_selection: str = "contribution",
    layout: str = "deepseek",
    rotary_residual: bool = True,
    latent_norm: str = "linear",
    sequential: bool = False,
    refine_steps: int = 0,
    progress: bool = False,
    report: MLAReport | None = None,
    device: str | torch.device = "cpu",
    sink: Sink | None = None,
) -> tuple[ModelConfig, StateDict]:
    """Every layer becomes MLA with a ``kv_lora_rank`` latent and ``rope_dims`` rotary dims per
    rotary key (DeepSeek's ``qk_rope_head_dim``); cached floats per token and layer:
    ``kv_lora_rank + rope_dims`` (``deepseek``) or ``kv_lora_rank + n_kv_heads·rope_dims`` (``kvforge``).

    ``rotary_residual=False`` drops what the shared rotary key misses instead of carrying it in the
    latent (an ablation); ``latent_norm`` chooses how ``kv_a_layernorm`` is handled (:data:`LATENT_NORMS`).
    ``report`` (an :class:`MLAReport`) receives the chosen pairs and the per-layer residual errors.
    ``device`` and ``sink`` as in :func:`~.gqa.to_gqa`."""
    check_mla_options(
        config,
        kv_lora_rank=kv_lora_rank,
        rope_dims=rope_dims,
        rope_selection=rope_selection,
        layout=layout,
        rotary_residual=rotary_residual,
        latent_norm=latent_norm,
    )
    calibration = check_calibration(calibration, config, "to_mla")
    statistics = _rope_statistics(config, state_dict, calibration, device) if calibration is not None else {}
    scores = _pair_scores(config, state_dict, statistics)
    pairs = select_pairs(config.head_dim // 2, rope_dims // 2, rope_selection, scores)
    theta = exported_theta(config.rope_theta, config.head_dim, pairs)
    check_exportable(pair_frequencies(config), pairs, theta, config.rope_scaling)
    if report is not None:
        report.pairs, report.theta = pairs, theta
    plan = MLAPlan(pairs, theta, layout, statistics, rotary_residual, latent_norm, report)
    new_config = mla_config(config, kv_lora_rank, rope_dims, plan)

    def build(contexts: list[LayerContext]) -> list[torch.nn.Module]:
        return [_mla_layer(config, new_config, plan, ctx) for ctx in contexts]

    options = FitOptions(sequential=sequential, refine_steps=refine_steps, progress=progress, device=device)
    return new_config, convert_attention(
        config, state_dict, new_config, calibration, build, options=options, sink=sink
    )


def mla_config(config: ModelConfig, kv_lora_rank: int, rope_dims: int, plan: MLAPlan) -> ModelConfig:
    deepseek = plan.layout == "deepseek"
    linear = deepseek and plan.latent_norm == "linear"
    return dataclasses.replace(
        config,
        n_kv_heads=config.n_heads,
        layers=[LayerSpec("mla", window=spec.window) for spec in config.layers],
        pattern=None,
        kv_lora_rank=kv_lora_rank,
        q_lora_rank=None,
        qk_rope_head_dim=rope_dims,
        qk_nope_head_dim=config.head_dim if plan.carries_residual else config.head_dim - rope_dims,
        v_head_dim=config.head_dim,
        mla_rope_heads=1 if deepseek else config.layers[0].n_kv_heads,
        mla_latent_norm=deepseek,
        # In the linear regime the latent norm divides by sqrt(eps): servers that take its eps from
        # rms_norm_eps (vLLM, SGLang, llama.cpp) must see the one transformers and kvforge fix.
        norm_eps=MLA_NORM_EPS if linear else config.norm_eps,
        # ... while kvforge's own model keeps the latent at a trainable scale with a larger eps (exported as
        # 1e-6 with the latent rows scaled back, see families.deepseek).
        mla_latent_norm_eps=LINEAR_EPS if linear else MLA_NORM_EPS,
        # Every layer is MLA now: rope_theta only drives the kept pairs (DeepseekV3 reads rope_theta).
        rope_theta=plan.theta,
        mla_rope_theta=None,
        # Qwen2 biases (see _mla_layer): rotary key bias -> kv_a_proj's bias, value bias -> o_proj's bias,
        # query bias -> q_proj's bias (kvforge-typed: DeepseekV3's q_proj has none).
        attention_bias=config.attention_bias,
        o_proj_bias=config.attention_bias or config.o_proj_bias,
        mla_q_bias=config.attention_bias,
        qk_norm=False,  # q/k norms became linear stand-ins (see .qk_norm.linearised)
    )


def _check_source(config: ModelConfig) -> None:
    check_gqa_source(config, "to_mla")
    unsupported = {
        # linear and llama3 scale each frequency on its own, so the kept pairs keep theirs under the same
        # scaling with the exported theta; yarn's ramp depends on the rotary width, which changes.
        "rope_scaling of type yarn": config.rope_scaling is not None and config.rope_scaling.type == "yarn",
        "kv_from (shared K/V)": any(spec.kv_from is not None for spec in config.layers),
        # MLA layers rotate with one base; Gemma 3's sliding layers have their own.
        "window_rope_theta (a separate RoPE base for sliding layers)": config.window_rope_theta is not None,
    }
    for name, present in unsupported.items():
        if present:
            raise ValueError(
                f"to_mla: sources with {name} are not supported (DeepseekV3 cannot express it exactly)"
            )


def _rope_statistics(config: ModelConfig, state_dict: StateDict, calibration: torch.Tensor, device) -> dict:
    """Rotary statistics of every layer of the source on the calibration ids (one stream pass, one
    layer in memory at a time)."""
    device = torch.device(device)
    stream = LayerStream(config, state_dict[EMBEDDINGS].to(device), calibration)
    freqs = pair_frequencies(config).to(device)
    ropes = {k: tuple(t.to(device) for t in v) for k, v in rope_tables(config, calibration.shape[1]).items()}
    statistics = {}
    for index in range(config.n_layers):
        layer = source_layer(config, state_dict, index, device)
        inputs = stream.attention_inputs(layer)
        stats = rope_statistics(linearised(layer.self_attn, inputs), inputs, freqs)
        statistics[index] = stats
        stream.advance(layer, ropes.get(rotary_key(config, config.layers[index])))
    return statistics


def _pair_scores(config: ModelConfig, state_dict: StateDict, statistics: dict) -> torch.Tensor:
    """How much each pair is worth keeping rotary, summed over layers and heads."""
    if statistics:
        return sum(stats.loss_if_position_free().sum(0) for stats in statistics.values())
    return sum(
        weight_scores(linearised(source_layer(config, state_dict, index).self_attn, None)).sum(0)
        for index in range(config.n_layers)
    )


def _mla_layer(config: ModelConfig, new_config: ModelConfig, plan: MLAPlan, ctx: LayerContext):
    attn = linearised(ctx.source, ctx.source_inputs)  # q/k norms (Qwen3) -> linear stand-ins
    n_heads, head_dim, bias = config.n_heads, config.head_dim, config.attention_bias
    kept, free = plan.pairs, plan.free_pairs(head_dim // 2)
    # With biases every row acts on [x, 1] (whitening included): a bias is one more input coordinate.
    whitening, source_whitening, cross = layer_whitening(ctx, bias, config.d_model)
    targets = head_targets(attn, whitening, source_whitening, cross)
    # Position-free keys and values without their biases: a constant key part adds q·b_k, the same for
    # every key of a query (softmax-invariant); a constant value b_v comes out of the softmax as b_v
    # (weights sum to 1) and moves to o_proj's bias. Rotary keys keep theirs (it rotates with the key).
    linear = head_targets(without_kv_bias(attn), whitening, source_whitening, cross) if bias else targets
    q_pairs = as_pairs(rows_with_bias(attn.q_proj), n_heads)  # (H, P, d [+1]) on x [, 1]
    stats = plan.statistics.get(ctx.index)
    phase = (
        stats.phase_factors()
        if stats is not None
        else torch.ones(q_pairs.shape[:2], dtype=torch.complex128, device=q_pairs.device)
    )

    # 1. rotary part
    nope_pairs, nope_keys = free, linear.key[:, free]
    if plan.layout == "deepseek":
        kept_targets = dataclasses.replace(
            targets, key=targets.key[:, kept], key_weight=targets.key_weight[:, kept]
        )
        key, alpha, error = merge_keys(kept_targets, range(n_heads))
        k_pe = from_pairs(whitening.rows_from_white(key).unsqueeze(0))
        if plan.report is not None:
            plan.report.rotary_residual[ctx.index] = error / max(
                kept_targets.key_energy(range(n_heads)), 1e-30
            )
        if plan.carries_residual:  # what the shared key misses of each head's kept pairs
            nope_pairs = free + kept
            residual = targets.key[:, kept] - alpha.unsqueeze(-1) * key
            nope_keys = torch.cat((nope_keys, residual), dim=1)
    else:
        k_pe = from_pairs(as_pairs(rows_with_bias(attn.k_proj), attn.n_kv_heads)[:, kept])
        alpha = torch.ones(n_heads, len(kept), dtype=torch.complex128, device=q_pairs.device)
    width = q_pairs.shape[-1]  # d_model (+1 with biases)
    q_pe = from_pairs(q_pairs[:, kept] * alpha.conj().unsqueeze(-1)).reshape(n_heads, 2 * len(kept), width)

    # 2. position-free part: the query absorbs the best fixed replacement of each lost rotation
    n_nope = 2 * len(nope_pairs)
    q_nope = from_pairs(q_pairs[:, nope_pairs] * phase[:, nope_pairs].unsqueeze(-1))
    q_nope = q_nope.reshape(n_heads, n_nope, width)
    k_nope = from_pairs(nope_keys).reshape(n_heads, n_nope, width)  # whitened

    # 3. joint latent of position-free keys and values. A position-free key's mean adds the same score
    # to every key a query sees (softmax-invariant), so key errors are measured centered: in whitened
    # coordinates (E[u uᵀ] = I, mean ū) the metric is I - ū ūᵀ. Values are measured uncentered (their
    # mean passes through the softmax), and a score error costs in proportion to the *spread* of the
    # head's output, so the key weight uses the centered value energy.
    mean = white_mean(ctx.inputs, whitening, bias) if ctx.inputs is not None else None
    value_energy = centered_output_energy(targets.value, targets.out_gram, mean)
    q_white = source_whitening.rows_to_white(q_nope)
    score_weight = (q_white @ q_white.mT) * (attn.scale**2 * value_energy).view(-1, 1, 1)
    k_metric = to_metric(k_nope, mean)
    gram = torch.einsum("hkd,hkl,hle->de", k_metric, score_weight, k_metric) + linear.value_gram(
        range(n_heads)
    )
    eigvals, eigvecs = torch.linalg.eigh(gram)
    basis = eigvecs[:, eigvals.argsort(descending=True)[: new_config.kv_lora_rank]].mT  # (r, d) orthonormal
    kv_b = torch.cat(
        (centered_readout(k_nope, basis, mean), linear.value @ basis.mT), dim=1
    )  # (H, nope + v, r)

    # 4. latent norm (see .latent_norm): linear regime, or a calibrated basis and weight
    latent_rows = whitening.rows_from_white(basis)
    weights = {}
    if new_config.mla_latent_norm:
        latent = flat_inputs(ctx.inputs, bias) @ latent_rows.mT if ctx.inputs is not None else None
        if plan.latent_norm == "linear":  # the source key rows' scale, unless the regime needs smaller
            eps = new_config.mla_latent_norm_eps
            natural = key_scale(latent_rows[:, : config.d_model], attn.k_proj.weight)
            scale = min(natural, linear_regime_scale(latent, latent_rows, eps))
            latent_rows, rho = latent_rows * scale, eps**0.5 / scale
        else:
            norm = (
                fit_latent_norm(latent, flatten=plan.latent_norm == "flatten") if latent is not None else None
            )
            if norm is not None:
                latent_rows, kv_b = norm.basis @ latent_rows, kv_b @ norm.basis_inv @ norm.readout
                if plan.report is not None:
                    plan.report.latent_norm[ctx.index] = norm
            rho = norm.weight if norm is not None else 1.0
        weights["kv_a_layernorm.weight"] = torch.full(
            (basis.shape[0],), rho, dtype=torch.float64, device=basis.device
        )

    # MLA scores use qk_head_dim**-0.5: rescale the query so logits keep the source's scale.
    q_scale = (new_config.qk_head_dim**0.5) * attn.scale
    weights.update(split_bias("q_proj", torch.cat((q_nope, q_pe), dim=1).reshape(-1, width) * q_scale, bias))
    weights.update(split_bias("kv_a_proj_with_mqa", torch.cat((latent_rows, k_pe)), bias))
    weights["kv_b_proj.weight"] = kv_b.reshape(-1, basis.shape[0])
    weights["o_proj.weight"] = attn.o_proj.weight.to(torch.float64)
    if new_config.o_proj_bias:
        weights["o_proj.bias"] = _output_bias(attn)
    return new_attention(new_config, ctx.index, weights)


def _output_bias(attn) -> torch.Tensor:
    """``o_proj``'s bias once the value bias leaves the values: ``b_o + Σ_h O_h b_v,h``."""
    o_weight = attn.o_proj.weight.to(torch.float64)
    bias = torch.zeros(o_weight.shape[0], dtype=torch.float64, device=o_weight.device)
    if attn.o_proj.bias is not None:
        bias += attn.o_proj.bias.to(torch.float64)
    if attn.v_proj.bias is not None:
        heads = attn.v_proj.bias.to(torch.float64).view(attn.n_kv_heads, attn.head_dim)
        bias += o_weight @ heads.repeat_interleave(attn.n_heads // attn.n_kv_heads, dim=0).reshape(-1)
    return bias


def without_kv_bias(attn: torch.nn.Module) -> torch.nn.Module:
    """A shallow copy of a GQA module whose ``k_proj``/``v_proj`` biases are zero (rows ``[W | 0]``)."""
    stripped = copy.copy(attn)
    stripped._modules = dict(attn._modules)
    for name in ("k_proj", "v_proj"):
        source = getattr(attn, name)
        zeroed = torch.nn.Linear(source.in_features, source.out_features, device="meta")
        zeroed.weight = source.weight
        zeroed.bias = torch.nn.Parameter(torch.zeros_like(source.bias), requires_grad=False)
        stripped._modules[name] = zeroed
    return stripped


# ---------------------------------------------------------------------------------------------- record
@dataclass(kw_only=True)
class MLAOptions(FittedOptions):
    """Multi-head latent attention: a low-rank latent plus a few rotary dims per token."""

    kv_lora_rank: int = option(help="latent width cached per token (DeepSeek's kv_lora_rank)")
    rope_dims: int = option(
        help="rotary dims of each rotary key (the exported qk_rope_head_dim; even, at most head_dim)"
    )
    rope_selection: Literal[STRATEGIES] = option(
        "contribution",
        help="which frequency pairs stay rotary: the ones the calibration attention needs most, the highest "
        "frequencies, or evenly spread ones (always a progression DeepseekV3 can express)",
    )
    layout: Literal[LAYOUTS] = option(
        "deepseek",
        help="deepseek: stock DeepseekV3 (one shared rotary key, latent RMSNorm); kvforge: one rotary key per "
        "source K/V head and no latent norm (exact at full rank, kvforge-typed)",
    )
    rotary_residual: bool = option(
        True, help="carry what the shared rotary key misses in the latent (False: an ablation)"
    )
    latent_norm: Literal[LATENT_NORMS] = option(
        "linear",
        help="kv_a_layernorm (deepseek layout): linear: the latent is scaled into the norm's eps-dominated "
        "regime, where it is an exact constant scale (bf16/fp32 serving); flatten: a latent basis whose rms "
        "varies least on calibration; weight: only the norm's weight is fitted",
    )


MLA = Transform("mla", to_mla, MLAOptions, check_mla_options, calibrates=True)
