"""Model configuration: model-wide sizes plus one :class:`LayerSpec` per layer.

The per-layer list is usually tiled from a short ``pattern`` (``[{window: 1024}] * 3 + [{}]`` for
3 local : 1 global, ``[{}, {kv_from: -1}]`` for cross-layer sharing with factor 2) and validated
once, here, with errors that name the layer, the field, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal

from .checks import check_positive, divisors
from .forms import ATTENTION_FORMS, form_of, forms_with

# LayerSpec fields a form may read (AttentionForm.layer_fields); refused on layers of other forms.
FORM_FIELDS = ("n_kv_heads", "n_latent_heads", "feature_dim", "conv_size")
ROPE_TYPES = ("linear", "llama3", "yarn")
MLA_ABSORB = ("auto", "always", "never")
# MLP activations: SwiGLU's silu (Llama) and GeGLU's tanh-approximated / exact gelu (Gemma 2/3).
MLP_ACTIVATIONS = ("silu", "gelu_pytorch_tanh", "gelu")


@dataclass
class LayerSpec:
    """How one decoder layer attends and what it caches.

    Args:
        attention: a form of :data:`.forms.ATTENTION_FORMS`: ``"gqa"`` (MHA, GQA and MQA:
            ``n_kv_heads`` = n_heads, n_heads/g, 1), ``"mla"`` (DeepSeek-V2/V3 multi-head latent
            attention), ``"gta"`` (grouped-tied attention: one tied K/V state per group plus one shared
            rotary key, see :mod:`.attention_gta`), ``"gla"`` (grouped-latent attention: MLA's latent
            in ``n_latent_heads`` heads, see :mod:`.attention_gla`), or a constant-state form:
            ``"linear"`` (linear attention with Hedgehog feature maps, optionally with a softmax
            ``window`` in the same layer as LoLCATs, :mod:`.attention_linear`) or ``"deltanet"`` (Gated
            DeltaNet as in Qwen3-Next, :mod:`.attention_deltanet`): no per-token cache, a fixed-size
            state per sequence.
        n_kv_heads: K/V heads (gta: tied states) of a ``gqa``/``gta`` layer; ``None`` takes the
            model's ``n_kv_heads``.
        window: ``None`` = global attention; ``W`` = sliding window of ``W`` tokens (itself included),
            cached in a ring buffer of ``W`` positions.
        kv_from: index of an earlier layer whose K/V (or latent) this layer reads instead of
            computing and caching its own. Negative values count back from this layer (``-1`` = the
            previous one) and are resolved to absolute indices.
        sinks: a learned logit per query head that takes part in the softmax with no value
            (gpt-oss's attention sinks): heads may attend to "nothing". Costs no cache bytes.
        chunk: ``C`` = chunked local attention (Llama 4's ``attention_chunk_size``): a query at ``p``
            sees the keys of its own chunk ``[C·⌊p/C⌋, p]``; cached in ``C`` slots that restart per chunk.
        rope: ``False`` = NoPE: no rotary embedding on this layer's queries and keys (Llama 4's
            global layers, ``no_rope_layers``). gqa layers only.
        n_latent_heads: latent heads of a ``gla`` layer (they split ``kv_lora_rank``; query head
            ``h`` reads latent head ``h // (n_heads / n_latent_heads)``).
        feature_dim: Hedgehog features per sign of a ``linear`` layer; ``None`` = head_dim.
        conv_size: width of a ``deltanet`` layer's short convolutions; ``None`` = 4 (Qwen3-Next's).
    """

    attention: str = "gqa"
    n_kv_heads: int | None = None
    window: int | None = None
    kv_from: int | None = None
    sinks: bool = False
    chunk: int | None = None
    rope: bool = True
    n_latent_heads: int | None = None
    feature_dim: int | None = None
    conv_size: int | None = None


@dataclass
class RopeScaling:
    """RoPE frequency scaling as Llama-3 (``llama3``), DeepSeek/Qwen (``yarn``) or linear
    interpolation (``linear``) checkpoints use; field names follow transformers' ``rope_parameters``."""

    type: Literal["linear", "llama3", "yarn"]
    factor: float
    original_max_seq_len: int | None = None
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    truncate: bool = True


@dataclass
class ModelConfig:
    """A decoder-only language model whose layers may mix attention forms.

    Architecture fields are exported with the model; ``attention_backend`` and ``mla_absorb`` are
    runtime choices (how to compute, not what is computed).
    """

    vocab_size: int = 32000
    d_model: int = 512
    n_layers: int = 8
    n_heads: int = 8
    n_kv_heads: int | None = None
    head_dim: int | None = None
    ffn_dim: int | None = None
    max_seq_len: int = 2048
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    # Biases of the projections that read the hidden state (q/k/v; MLA: q_a/kv_a) and of o_proj, apart:
    # Qwen2 biases q/k/v only, while Llama/Qwen3/DeepSeek `attention_bias=true` biases o_proj too.
    attention_bias: bool = False
    o_proj_bias: bool = False
    qk_norm: bool = False
    init_std: float = 0.02
    # Gemma 2/3 traits; the defaults are the Llama recipe. `mlp_activation` gates the MLP (silu = SwiGLU,
    # gelu_pytorch_tanh = GeGLU). `norm_unit_offset`: every RMSNorm scales by (1 + weight), the stored
    # weight being the offset (kept as stored, so it round-trips bit-exactly). `sandwich_norms`: the
    # attention and MLP outputs are normalised too before their residual add. `embed_scale`: embeddings
    # times sqrt(d_model) (in the hidden dtype). `query_pre_attn_scalar`: scores scale by its -1/2
    # power instead of head_dim's. Soft-capping: cap * tanh(x / cap) on attention scores / final logits.
    # `window_rope_theta`: sliding layers rotate with this base and no scaling (Gemma 3's
    # rope_local_base_freq); global layers keep rope_theta and rope_scaling.
    mlp_activation: str = "silu"
    norm_unit_offset: bool = False
    sandwich_norms: bool = False
    embed_scale: bool = False
    query_pre_attn_scalar: int | None = None
    attn_logit_softcap: float | None = None
    final_logit_softcap: float | None = None
    window_rope_theta: float | None = None
    # MLA sizes (DeepSeek names); required when any layer is "mla".
    kv_lora_rank: int | None = None
    q_lora_rank: int | None = None
    qk_rope_head_dim: int | None = None
    qk_nope_head_dim: int | None = None
    v_head_dim: int | None = None
    # kvforge generalisations of MLA used by lossless conversion; stock DeepseekV3 needs 1 and True.
    mla_rope_heads: int = 1
    mla_latent_norm: bool = True
    mla_rope_theta: float | None = None
    # kv_a_layernorm's eps. DeepSeek fixes it at 1e-6 (attention_mla.MLA_NORM_EPS); to_mla's linear-regime latent
    # norm raises it with the latent's scale (RMSNorm(s·c; eps·s²) = RMSNorm(c; eps)) so kv_a_proj_with_mqa keeps
    # trainable weights; a stock DeepSeek export scales those rows back to 1e-6 (families.deepseek).
    mla_latent_norm_eps: float = 1e-6
    # A bias on MLA's q_proj (q_lora_rank=None): a Qwen2 query bias through to_mla (b_q·k varies with the key,
    # so nothing else holds it). DeepseekV3's q_proj has none: such a model exports kvforge-typed.
    mla_q_bias: bool = False
    # Per-layer forms: `layers` explicitly, or `pattern` tiled over n_layers, or all default GQA.
    pattern: list[LayerSpec] | None = None
    layers: list[LayerSpec] | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None  # a list: several end tokens (Llama-3 checkpoints)
    pad_token_id: int | None = None
    # Every other *_token_id of the source's config.json (unk_token_id, sep_token_id, ...): not used by the
    # model, kept through conversion so that an export writes what it read.
    special_token_ids: dict[str, int | list[int] | None] = field(default_factory=dict)
    # Runtime options.
    attention_backend: str = "auto"
    mla_absorb: Literal["auto", "always", "never"] = "auto"

    def __post_init__(self) -> None:
        if isinstance(self.rope_scaling, dict):
            self.rope_scaling = _as_rope_scaling(self.rope_scaling)
        elif self.rope_scaling is not None and not isinstance(self.rope_scaling, RopeScaling):
            raise ValueError(
                f"ModelConfig.rope_scaling={self.rope_scaling!r}: expected a dict like {{type: yarn, factor: 4.0, ...}} or None"
            )
        _check_types(self, "ModelConfig")
        self.pattern = _as_specs(self.pattern, "pattern")
        self.layers = _as_specs(self.layers, "layers")
        check_positive(self, ("vocab_size", "d_model", "n_layers", "n_heads", "max_seq_len"))
        if self.head_dim is None:
            if self.d_model % self.n_heads:
                raise ValueError(
                    f"ModelConfig.head_dim: d_model={self.d_model} is not divisible by n_heads={self.n_heads}; "
                    "set head_dim explicitly"
                )
            self.head_dim = self.d_model // self.n_heads
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.ffn_dim is None:
            self.ffn_dim = _default_ffn_dim(self.d_model)
        check_positive(
            self,
            (
                "head_dim",
                "n_kv_heads",
                "ffn_dim",
                "rope_theta",
                "norm_eps",
                "mla_rope_heads",
                "mla_latent_norm_eps",
            ),
        )
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"ModelConfig.n_kv_heads={self.n_kv_heads} must divide n_heads={self.n_heads} "
                f"(allowed: {divisors(self.n_heads)})"
            )
        self.layers = self._resolve_layers()
        self._validate_layers()
        for name, form in ATTENTION_FORMS.items():  # model-wide checks of each form present
            if name in self.forms:
                form.check_model(self)
        if self.rope_scaling is not None:
            _validate_rope_scaling(self.rope_scaling)
        self._validate_gemma_traits()
        if self.mla_absorb not in MLA_ABSORB:
            raise ValueError(
                f"ModelConfig.mla_absorb={self.mla_absorb!r}: allowed values are {list(MLA_ABSORB)}"
            )

    # ----------------------------------------------------------------------------------------------
    def _resolve_layers(self) -> list[LayerSpec]:
        if self.layers is not None:
            if len(self.layers) != self.n_layers:
                raise ValueError(
                    f"ModelConfig.layers has {len(self.layers)} entries but n_layers={self.n_layers}; "
                    "give one LayerSpec per layer (or use `pattern`)"
                )
            source = self.layers
        elif self.pattern:
            if self.n_layers % len(self.pattern):
                raise ValueError(
                    f"ModelConfig.pattern has {len(self.pattern)} entries, which does not divide "
                    f"n_layers={self.n_layers}; use a pattern whose length divides n_layers or list `layers`"
                )
            source = self.pattern * (self.n_layers // len(self.pattern))
        else:
            source = [LayerSpec()] * self.n_layers
        layers = []
        for index, spec in enumerate(source):
            spec = dataclasses.replace(spec)
            if spec.kv_from is not None and spec.kv_from < 0:
                spec.kv_from = index + spec.kv_from
            layers.append(spec)
        return layers

    def _validate_layers(self) -> None:
        for index, spec in enumerate(self.layers):
            where = f"ModelConfig.layers[{index}]"
            if spec.attention not in ATTENTION_FORMS:  # before any fact of the form is read
                raise ValueError(
                    f"{where}.attention={spec.attention!r}: allowed values are {list(ATTENTION_FORMS)}"
                )
            if spec.window is not None and (not isinstance(spec.window, int) or spec.window <= 0):
                raise ValueError(
                    f"{where}.window={spec.window!r}: must be a positive number of tokens or None (global)"
                )
            if spec.chunk is not None:
                if not isinstance(spec.chunk, int) or spec.chunk <= 0:
                    raise ValueError(
                        f"{where}.chunk={spec.chunk!r}: must be a positive number of tokens or None (no chunks)"
                    )
                if spec.window is not None:
                    raise ValueError(
                        f"{where}.chunk={spec.chunk}: this layer also has window={spec.window}; a layer is "
                        "either chunked or sliding (set one of them to None)"
                    )
            form = form_of(spec)
            if not spec.rope and "nope" not in form.traits:
                raise ValueError(
                    f"{where}.rope=False: NoPE is for {', '.join(forms_with(trait='nope'))} layers; an "
                    f"{spec.attention!r} layer always rotates (allowed: rope=True)"
                )
            for name in FORM_FIELDS:
                value = getattr(spec, name)
                if value is not None and name not in form.layer_fields:
                    raise ValueError(
                        f"{where}.{name}={value}: only {', '.join(forms_with(field=name))} layers have "
                        f"{name}; this layer is {spec.attention!r} (set {name}=None)"
                    )
            if spec.kv_from is None:
                form.check_layer(self, index, spec)
            else:
                self._validate_kv_from(index, spec)

    def _validate_kv_from(self, index: int, spec: LayerSpec) -> None:
        where = f"ModelConfig.layers[{index}].kv_from={spec.kv_from}"
        if not 0 <= spec.kv_from < index:
            raise ValueError(
                f"{where}: must name an earlier layer (0..{index - 1}) or count back with a negative offset; "
                "a layer cannot read its own or a later layer's K/V"
                if index
                else f"{where}: layer 0 has no earlier layer to read K/V from"
            )
        source = self.layers[spec.kv_from]
        if source.kv_from is not None:
            raise ValueError(
                f"{where}: layer {spec.kv_from} itself reads K/V from layer {source.kv_from}; point at the layer "
                f"that owns the K/V (kv_from={source.kv_from})"
            )
        if source.attention != spec.attention:
            raise ValueError(
                f"{where}: layer {spec.kv_from} is {source.attention!r} but this layer is {spec.attention!r}; "
                "K/V can only be shared between layers of the same attention form"
            )
        for name in ("window", "chunk", "rope"):
            theirs, ours = getattr(source, name), getattr(spec, name)
            if theirs != ours:
                raise ValueError(
                    f"{where}: layer {spec.kv_from} has {name}={theirs} but this layer has {name}={ours}; "
                    "a layer that reads another's K/V attends over the same span with the same positions"
                )
        for name in form_of(spec).layer_fields:  # the cache's shape is the source's
            ours, theirs = getattr(spec, name), getattr(source, name)
            if ours is not None and ours != theirs:
                raise ValueError(
                    f"ModelConfig.layers[{index}].{name}={ours}: this layer reads layer {spec.kv_from}'s "
                    f"cache, which has {name}={theirs}"
                )
            setattr(spec, name, theirs)

    def _validate_gemma_traits(self) -> None:
        if self.mlp_activation not in MLP_ACTIVATIONS:
            raise ValueError(
                f"ModelConfig.mlp_activation={self.mlp_activation!r}: allowed values are {list(MLP_ACTIVATIONS)}"
            )
        for name in (
            "query_pre_attn_scalar",
            "attn_logit_softcap",
            "final_logit_softcap",
            "window_rope_theta",
        ):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"ModelConfig.{name}={value!r}: must be positive or None (off)")
        if self.window_rope_theta is not None:
            for index, spec in enumerate(self.layers):
                rotates = "window_rope_theta" in form_of(spec).traits and spec.rope
                if spec.window is not None and not rotates:
                    raise ValueError(
                        f"ModelConfig.window_rope_theta={self.window_rope_theta}: layer {index} slides but is "
                        f"{spec.attention!r}{'' if spec.rope else ' without RoPE'}; a separate RoPE base for "
                        f"sliding layers applies to {', '.join(forms_with(trait='window_rope_theta'))} layers "
                        "with RoPE only (allowed: window_rope_theta=None)"
                    )
        for name in ("attn_logit_softcap", "query_pre_attn_scalar"):
            value = getattr(self, name)
            for index, spec in enumerate(self.layers):
                if value is not None and name not in form_of(spec).traits:
                    raise ValueError(
                        f"ModelConfig.{name}={value}: layer {index} is {spec.attention!r}, whose attention "
                        f"does not implement it ({' and '.join(forms_with(trait=name))} layers do; allowed for "
                        f"this model: {name}=None)"
                    )

    # ----------------------------------------------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        """Per-head query/key width of MLA layers (nope + rope part)."""
        return (self.qk_nope_head_dim or 0) + (self.qk_rope_head_dim or 0)

    @property
    def forms(self) -> set[str]:
        return {spec.attention for spec in self.layers}

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form; the resolved ``layers`` take precedence over ``pattern`` when read back."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        if data.get("extra") == {}:  # an unused field that configs written before its removal still hold
            data = {key: value for key, value in data.items() if key != "extra"}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"ModelConfig: unknown field(s) {unknown}; allowed fields are {sorted(known)}")
        return cls(**data)

    def replace(self, **changes: Any) -> ModelConfig:
        """A validated copy with ``changes`` applied (``pattern``/``layers`` re-resolved)."""
        data = self.to_dict()
        data.update(changes)
        if "pattern" in changes and "layers" not in changes:
            data["layers"] = None
        return ModelConfig.from_dict(data)


# Field types a config read from JSON/YAML may get wrong; checked before any arithmetic on them.
_SCALAR_TYPES = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,)}


def _check_types(obj: object, where: str) -> None:
    for f in dataclasses.fields(obj):
        allowed = [part.strip() for part in str(f.type).split("|")]
        value = getattr(obj, f.name)
        if value is None and "None" in allowed:
            continue
        scalar = [name for name in allowed if name in _SCALAR_TYPES]
        if not scalar or len(scalar) != len([a for a in allowed if a != "None"]):
            continue  # containers, dataclasses and literals are checked where they are used
        types = tuple(t for name in scalar for t in _SCALAR_TYPES[name])
        is_bool = isinstance(value, bool)
        if not isinstance(value, types) or (is_bool and "bool" not in scalar):
            raise ValueError(f"{where}.{f.name}={value!r}: expected {f.type}, got {type(value).__name__}")


def _as_rope_scaling(data: dict) -> RopeScaling:
    allowed = {f.name for f in dataclasses.fields(RopeScaling)}
    unknown = sorted(set(data) - allowed)
    if unknown or "type" not in data or "factor" not in data:
        raise ValueError(
            f"ModelConfig.rope_scaling={data!r}: needs 'type' and 'factor'; allowed keys are {sorted(allowed)}"
        )
    scaling = RopeScaling(**data)
    _check_types(scaling, "ModelConfig.rope_scaling")
    return scaling


def _as_specs(specs: list[LayerSpec | dict] | None, name: str) -> list[LayerSpec] | None:
    if specs is None:
        return None
    if not isinstance(specs, list):
        raise ValueError(f"ModelConfig.{name}={specs!r}: expected a list of LayerSpec (or dicts)")
    out = []
    allowed = {f.name for f in dataclasses.fields(LayerSpec)}
    for index, spec in enumerate(specs):
        where = f"ModelConfig.{name}[{index}]"
        if isinstance(spec, dict):
            unknown = sorted(set(spec) - allowed)
            if unknown:
                raise ValueError(f"{where}: unknown field(s) {unknown}; allowed are {sorted(allowed)}")
            spec = LayerSpec(**spec)
        elif not isinstance(spec, LayerSpec):
            raise ValueError(f"{where}={spec!r}: expected a LayerSpec or a dict")
        _check_types(spec, where)
        out.append(spec)
    return out


def _default_ffn_dim(d_model: int, multiple_of: int = 256) -> int:
    """SwiGLU width ~ 8/3 · d_model rounded up to a multiple (the Llama recipe)."""
    hidden = int(2 * (4 * d_model) / 3)
    return multiple_of * math.ceil(hidden / multiple_of)


def _validate_rope_scaling(scaling: RopeScaling) -> None:
    if scaling.type not in ROPE_TYPES:
        raise ValueError(
            f"ModelConfig.rope_scaling.type={scaling.type!r}: allowed values are {list(ROPE_TYPES)}"
        )
    if scaling.factor is None or scaling.factor <= 0:
        raise ValueError(f"ModelConfig.rope_scaling.factor={scaling.factor!r}: must be positive")
    if scaling.type in ("llama3", "yarn") and not scaling.original_max_seq_len:
        raise ValueError(
            f"ModelConfig.rope_scaling.original_max_seq_len is required for type={scaling.type!r} "
            "(the context length the model was pre-trained with)"
        )
