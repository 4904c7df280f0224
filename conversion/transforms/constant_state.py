"""MHA/GQA → a hybrid with constant-state layers: chosen softmax-attention layers become linear attention
(Hedgehog feature maps plus a softmax window, as LoLCATs) or Gated DeltaNet (as Qwen3-Next); the others
keep softmax attention.

Which layers convert: ``layers`` (explicit indices), else a ratio ``r`` converted : 1 kept, i.e.
``n_layers // (r + 1)`` layers keep full attention, chosen by ``keep``:

- ``ends`` (default): the first and last layers first (``0, n - 1, 1, n - 2, ...``);
- ``even``: every ``(r + 1)``-th layer (indices ``r, 2r + 1, ...``): Qwen3-Next's and Kimi Linear's layout;
- ``error``: the layers whose attention transfer fits worst (a first pass fits every layer on the
  calibration tokens and measures each one's relative error).

``ends`` is the default because it measured best of the free choices (docs/constant_state.md); ``error``
fits every layer twice.

Initialisation keeps the source's ``q_proj, k_proj, v_proj, o_proj`` (and biases): a linear layer keeps
its RoPE and starts from identity feature maps; a deltanet layer drops RoPE (its short convolutions and
decay carry order), folds a Qwen3 q/k norm's weights into the projections (its L2 norm then removes the
per-token scale), starts from identity convolutions, ``β = 1/2``, a decay of about 0.97 per token and
a zero output gate. Then, one layer at a time on the calibration stream (:mod:`.layerwise`: each layer
sees what the converted layers before it produce), **attention transfer** (LoLCATs, Zhang et al. 2025):
``transfer_steps`` Adam steps on the new parameters only (``transfer="new"``: feature maps and window
factors; gates, convolutions, output gate and norm) - or on the whole block (``"all"``) - to reproduce
the source layer's output; then ``o_proj`` is refitted by least squares and ``refine_steps`` optionally
trains the whole block further. Uptraining with distillation follows (``configs/uptrain/hybrid.yaml``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import torch

from kvforge.arch import LayerSpec, ModelConfig

from .calibration import check_calibration
from .common import Sink, StateDict, check_gqa_source, check_rope_kept, is_count
from .fitting import FitUnit, refine_attention
from .layerwise import FitOptions, LayerContext, convert_attention, new_attention
from .record import Transform, option

FORMS = ("linear", "deltanet")
KEEP = ("even", "ends", "error")
TRANSFER = ("new", "all")
DEFAULT_WINDOW = 64  # LoLCATs' sliding window
# Parameters a converted block adds to the source's projections: what transfer="new" trains.
NEW_PARAMETERS = {
    "linear": ("feature_map_q", "feature_map_k", "window_factors"),
    "deltanet": (
        "a_proj",
        "b_proj",
        "A_log",
        "dt_bias",
        "q_conv1d",
        "k_conv1d",
        "v_conv1d",
        "g_proj",
        "o_norm",
    ),
}
INITIAL_DECAY = 0.97  # deltanet: α per token at init (a memory of ~30 tokens before any training)


class NullSink:
    """Discards what a transform writes (the measuring pass of ``keep="error"``)."""

    def write(self, tensors: StateDict, config: ModelConfig) -> None:
        return None


def kept_layers(n_layers: int, ratio: int, keep: str, errors: dict[int, float] | None = None) -> list[int]:
    """Indices that keep full attention for ``ratio`` converted : 1 kept (``n_layers // (ratio + 1)`` of them)."""
    count = n_layers // (ratio + 1)
    if keep == "even":
        return [index for index in range(n_layers) if index % (ratio + 1) == ratio][:count]
    if keep == "ends":
        order = [index for pair in zip(range(n_layers), reversed(range(n_layers))) for index in pair]
        return sorted(list(dict.fromkeys(order))[:count])  # 0, n-1, 1, n-2, ...
    if errors is None:
        raise ValueError("keep='error' needs the per-layer errors of a measuring pass")
    return sorted(sorted(errors, key=lambda index: -errors[index])[:count])


def state_config(
    config: ModelConfig,
    form: str,
    *,
    layers: list[int] | None = None,
    ratio: int = 3,
    keep: str = "ends",
    window: int | None = DEFAULT_WINDOW,
    feature_dim: int | None = None,
    conv_size: int | None = None,
    transfer: str = "new",
    transfer_steps: int = 300,
    errors: dict[int, float] | None = None,
) -> tuple[ModelConfig, list[int]]:
    """The target config and the converted layers' indices (validates every option on the config alone;
    ``keep="error"`` without ``errors`` converts every layer: the measuring pass's layout)."""
    what = f"to_{form}"
    if form not in FORMS:
        raise ValueError(f"{what}: allowed constant-state forms are {list(FORMS)}")
    check_gqa_source(config, what)
    if keep not in KEEP:
        raise ValueError(f"{what}: keep={keep!r}: allowed values are {list(KEEP)}")
    if transfer not in TRANSFER:
        raise ValueError(f"{what}: transfer={transfer!r}: allowed values are {list(TRANSFER)}")
    if not is_count(transfer_steps) or transfer_steps < 0:
        raise ValueError(f"{what}: transfer_steps={transfer_steps!r} must be an integer >= 0")
    if not is_count(ratio) or ratio < 1:
        raise ValueError(f"{what}: ratio={ratio!r} must be an integer >= 1 (converted layers per kept one)")
    if layers is not None:
        bad = [i for i in layers if not is_count(i) or not 0 <= i < config.n_layers]
        if bad or not layers or len(set(layers)) != len(layers):
            raise ValueError(
                f"{what}: layers={layers!r} must be distinct layer indices in 0..{config.n_layers - 1}"
            )
        converted = sorted(layers)
    elif keep == "error" and errors is None:
        converted = list(range(config.n_layers))
    else:
        kept = set(kept_layers(config.n_layers, ratio, keep, errors))
        converted = [index for index in range(config.n_layers) if index not in kept]
    if form == "linear" and window is not None and (not is_count(window) or window < 0):
        raise ValueError(f"{what}: window={window!r} must be a number of tokens >= 0 (0 or None: no window)")
    specs = [dataclasses.replace(spec) for spec in config.layers]
    for index in converted:
        spec = config.layers[index]
        for name, value in (("kv_from", spec.kv_from), ("chunk", spec.chunk)):
            if value is not None:
                raise ValueError(
                    f"{what}: layer {index} has {name}={value}; convert layers that own full or windowed K/V"
                )
        if spec.sinks:
            raise ValueError(f"{what}: layer {index} has attention sinks; a constant-state layer has none")
        if form == "linear":
            specs[index] = LayerSpec(
                "linear", spec.n_kv_heads, window=window or None, rope=spec.rope, feature_dim=feature_dim
            )
        else:
            specs[index] = LayerSpec("deltanet", spec.n_kv_heads, conv_size=conv_size)
    for index, spec in enumerate(config.layers):
        if spec.kv_from is not None and spec.kv_from in converted:
            raise ValueError(
                f"{what}: layer {index} reads layer {spec.kv_from}'s K/V, which would become a {form} layer "
                "(keep it, or convert both)"
            )
    target = ModelConfig.from_dict(dataclasses.replace(config, layers=specs, pattern=None).to_dict())
    if form == "linear":  # a linear layer rotates as a gqa layer: sliding ones with Gemma 3's local base
        check_rope_kept(config, target, what)
    return target, converted


def to_linear(config: ModelConfig, state_dict: StateDict, calibration: torch.Tensor | None = None, **options):
    """Linear attention (Hedgehog + a softmax ``window``, default 64) on the chosen layers."""
    return to_constant_state(config, state_dict, calibration, form="linear", **options)


def to_deltanet(
    config: ModelConfig, state_dict: StateDict, calibration: torch.Tensor | None = None, **options
):
    """Gated DeltaNet (``conv_size`` short convolutions, default 4) on the chosen layers."""
    options.pop("window", None)
    return to_constant_state(config, state_dict, calibration, form="deltanet", window=None, **options)


def to_constant_state(
    config: ModelConfig,
    state_dict: StateDict,
    calibration: torch.Tensor | None = None,
    *,
    form: str,
    layers: list[int] | None = None,
    ratio: int = 3,
    keep: str = "ends",
    window: int | None = DEFAULT_WINDOW,
    feature_dim: int | None = None,
    conv_size: int | None = None,
    transfer: str = "new",
    transfer_steps: int = 300,
    transfer_lr: float = 1e-2,
    sequential: bool = True,
    refine_steps: int = 0,
    progress: bool = False,
    device: str | torch.device = "cpu",
    sink: Sink | None = None,
    report: dict | None = None,
) -> tuple[ModelConfig, StateDict]:
    """See the module docstring. ``report`` (optional) receives ``{"errors": {layer: relative error}}``
    after attention transfer and ``o_proj`` refit (kept layers included), and ``{"measured": ...}`` from
    ``keep="error"``'s measuring pass."""
    layout = {
        "layers": layers,
        "ratio": ratio,
        "keep": keep,
        "window": window,
        "feature_dim": feature_dim,
        "conv_size": conv_size,
        "transfer": transfer,
        "transfer_steps": transfer_steps,
    }
    new_config, converted = state_config(config, form, **layout)
    calibration = check_calibration(calibration, config, f"to_{form}")
    if calibration is None and (transfer_steps or (keep == "error" and layers is None)):
        raise ValueError(
            f"to_{form}: attention transfer fits on calibration data; pass calibration token ids (kvforge convert "
            "--calib self or FILE), or transfer_steps=0 with keep='even'/'ends' for the initialisation alone"
        )
    fit = {"transfer": transfer, "steps": transfer_steps, "lr": transfer_lr}
    if keep == "error" and layers is None:  # first pass: fit every layer on the source's own inputs
        measured: dict = {}
        options = FitOptions(sequential=False, progress=progress, device=device)
        build = _builder(config, new_config, converted, form, fit)
        convert_attention(
            config, state_dict, new_config, calibration, build, None, options, measured, NullSink()
        )
        errors = {group[0]: error for group, error in measured.items()}
        new_config, converted = state_config(config, form, **layout, errors=errors)
        if report is not None:
            report["measured"] = errors
    options = FitOptions(sequential=sequential, refine_steps=refine_steps, progress=progress, device=device)
    errors: dict = {}
    build = _builder(config, new_config, converted, form, fit)
    out = convert_attention(config, state_dict, new_config, calibration, build, None, options, errors, sink)
    if report is not None:
        report["errors"] = {group[0]: error for group, error in errors.items()}
        report["converted"] = converted
    return new_config, out


def _builder(config: ModelConfig, new_config: ModelConfig, converted: list[int], form: str, fit: dict):
    def build(contexts: list[LayerContext]) -> list[torch.nn.Module]:
        modules = []
        for ctx in contexts:
            weights = dict(ctx.source.state_dict())
            if ctx.index not in converted:
                modules.append(new_attention(new_config, ctx.index, weights))
                continue
            init = _linear_weights if form == "linear" else _deltanet_weights
            module = new_attention(new_config, ctx.index, init(config, new_config, ctx.index, weights))
            if ctx.inputs is not None and fit["steps"]:
                unit = FitUnit(module, ctx.inputs, ctx.targets, ctx.rope)
                names = NEW_PARAMETERS[form]
                params = [
                    p
                    for n, p in module.named_parameters()
                    if fit["transfer"] == "all" or n.split(".")[0] in names
                ]
                # one absolute rate: the new parameters start at zero (window factors, gates)
                refine_attention([unit], fit["steps"], fit["lr"], parameters=params, relative_lr=False)
            modules.append(module)
        return modules

    return build


def _linear_weights(
    config: ModelConfig, new_config: ModelConfig, index: int, weights: StateDict
) -> StateDict:
    """The source's projections (and q/k norms), identity feature maps, window factors 0."""
    spec = new_config.layers[index]
    features = spec.feature_dim or config.head_dim
    eye = torch.eye(config.head_dim, features).expand(config.n_heads, -1, -1).clone()
    out = {**weights, "feature_map_q": eye, "feature_map_k": eye.clone()}
    if spec.window:
        out["window_factors"] = torch.zeros(config.n_heads)
    return out


def _deltanet_weights(
    config: ModelConfig, new_config: ModelConfig, index: int, weights: StateDict
) -> StateDict:
    """The source's q/k/v/o (q/k norm weights folded in, RoPE dropped) and the new parameters' start."""
    spec, head_dim, d = new_config.layers[index], config.head_dim, config.d_model
    out = {
        name: weights[name]
        for name in weights
        if name.split(".")[0] in ("q_proj", "k_proj", "v_proj", "o_proj")
    }
    # l2norm(rmsnorm(x) · w) = l2norm(x · w): a q/k norm's weight is a row scale (Gemma's is 1 + w)
    for proj, norm in (("q_proj", "q_norm"), ("k_proj", "k_norm")):
        if f"{norm}.weight" in weights:
            scale = weights[f"{norm}.weight"].float() + (1.0 if config.norm_unit_offset else 0.0)
            scale = scale.repeat(weights[f"{proj}.weight"].shape[0] // head_dim)
            out[f"{proj}.weight"] = weights[f"{proj}.weight"] * scale.unsqueeze(1)
            if f"{proj}.bias" in weights:
                out[f"{proj}.bias"] = weights[f"{proj}.bias"] * scale
    heads, width = spec.n_kv_heads, config.n_heads * head_dim
    conv = (spec.conv_size or 4) - 1
    for name, channels in (
        ("q_conv1d", width),
        ("k_conv1d", heads * head_dim),
        ("v_conv1d", heads * head_dim),
    ):
        identity = torch.zeros(channels, 1, conv + 1)
        identity[..., -1] = 1.0
        out[f"{name}.weight"] = identity
    dt = -math.log(INITIAL_DECAY)  # α = exp(-A · softplus(dt_bias)) with A = 1
    out.update(
        {
            "a_proj.weight": torch.zeros(heads, d),
            "b_proj.weight": torch.zeros(heads, d),
            "A_log": torch.zeros(heads),
            "dt_bias": torch.full((heads,), dt + math.log(-math.expm1(-dt))),
            "g_proj.weight": torch.zeros(width, d),
            "o_norm.weight": torch.ones(head_dim),
        }
    )
    return out


# ---------------------------------------------------------------------------------------------- records
def parse_layers(text: str) -> list[int]:
    """``0,1,2,4`` → ``[0, 1, 2, 4]``."""
    try:
        return [int(item) for item in text.split(",")]
    except ValueError:
        raise ValueError(f"--layers {text!r}: expected a comma list of layer indices") from None


@dataclasses.dataclass(kw_only=True)
class StateOptions:
    """Which layers become constant-state layers and how attention transfer fits them (to_linear,
    to_deltanet)."""

    layers: list[int] | None = option(
        None,
        help="layers to convert (default: --ratio converted per kept full-attention layer)",
        parse=parse_layers,
    )
    ratio: int = option(
        3, help="converted layers per kept full-attention layer: n_layers // (ratio + 1) are kept"
    )
    keep: Literal[KEEP] = option(
        "ends",
        help="which layers keep full attention: ends (first and last first; the best default measured on "
        "stories260K), even (every ratio+1-th, Qwen3-Next's layout), error (those whose attention transfer "
        "fits worst: every layer is fitted twice)",
    )
    transfer: Literal[TRANSFER] = option(
        "new", help="attention transfer trains the new parameters (new) or the whole block (all)"
    )
    transfer_steps: int = option(300, help="attention-transfer Adam steps per converted layer")
    transfer_lr: float = option(1e-2, help="attention-transfer learning rate (cosine-decayed)")
    sequential: bool = option(
        True, help="each layer is fitted to the converted model's own inputs (False: the source's)"
    )


@dataclasses.dataclass(kw_only=True)
class LinearOptions(StateOptions):
    """Chosen layers to linear attention (Hedgehog feature maps + a softmax window), attention transfer."""

    window: int = option(DEFAULT_WINDOW, help="softmax window of each linear layer, as LoLCATs (0: none)")
    feature_dim: int | None = option(None, help="Hedgehog features per sign (default head_dim)")


@dataclasses.dataclass(kw_only=True)
class DeltaNetOptions(StateOptions):
    """Chosen layers to Gated DeltaNet (Qwen3-Next's linear layer), attention transfer."""

    conv_size: int | None = option(None, help="short convolution width of the deltanet layers (default 4)")


def linear_config(config: ModelConfig, *, transfer_lr: float = 1e-2, **options) -> ModelConfig:
    """The target config of :func:`to_linear` (validates the options on the config alone)."""
    return state_config(config, "linear", **options)[0]


def deltanet_config(config: ModelConfig, *, transfer_lr: float = 1e-2, **options) -> ModelConfig:
    """The target config of :func:`to_deltanet` (validates the options on the config alone)."""
    return state_config(config, "deltanet", window=None, **options)[0]


LINEAR = Transform("linear", to_linear, LinearOptions, linear_config, calibrates=True)
DELTANET = Transform("deltanet", to_deltanet, DeltaNetOptions, deltanet_config, calibrates=True)
