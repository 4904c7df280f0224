"""Gemma 2 (``gemma2``) and Gemma 3 text (``gemma3_text``): GQA decoders with Gemma's own recipe.

What differs from Llama, read from transformers' ``modeling_gemma2.py``/``modeling_gemma3.py``:
- GeGLU MLP (``hidden_activation``, default ``gelu_pytorch_tanh``) → ``mlp_activation``;
- every RMSNorm scales by ``1 + weight`` in float32 before the cast → ``norm_unit_offset`` (weights
  kept as stored, so they round-trip bit-exactly);
- sandwich norms: Gemma's ``post_attention_layernorm`` normalises the *attention output* and
  ``pre_feedforward_layernorm`` is the pre-MLP norm (Llama's ``post_attention_layernorm``): the
  family renames them to kvforge's ``attention_output_layernorm`` / ``post_attention_layernorm``;
  ``post_feedforward_layernorm`` keeps its name → ``sandwich_norms``;
- embeddings times ``sqrt(hidden_size)`` rounded to the weight dtype → ``embed_scale``;
- scores scaled by ``query_pre_attn_scalar ** -0.5`` → ``query_pre_attn_scalar``;
- Gemma 2: ``attn_logit_softcapping`` and ``final_logit_softcapping`` (cap · tanh(x / cap)). Gemma 3
  applies the final cap but its attention ignores ``attn_logit_softcapping`` (transformers never passes
  it to the attention function), so a Gemma 3 config with one is refused rather than guessed at;
- Gemma 3: q/k RMSNorm per head; sliding layers rotate with ``rope_parameters.sliding_attention``
  (``rope_local_base_freq``, unscaled) and global layers with ``full_attention`` (``rope_theta`` +
  scaling) → ``window_rope_theta``;
- ``layer_types`` say which layers slide; without them Gemma 2 alternates (layer 0 slides) and Gemma 3
  slides all but every ``sliding_window_pattern``-th (6) layer. A query sees ``sliding_window`` keys,
  itself included (``kv_idx > q_idx - sliding_window``), which is kvforge's ``window``.
- ``use_bidirectional_attention`` (embedding models) is refused: kvforge decoders are causal.
An absent key takes the default of transformers' ``Gemma2Config``/``Gemma3TextConfig`` (tests compare
the tables with the pinned transformers).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kvforge.arch import ModelConfig

from .base import StockFamily
from .layers import FULL, SLIDING, GQALayers, single_window
from .llama import size_keys
from .rope import Rope, _scaling_dict
from .schema import TRANSFORMERS, Codec, ConfigReader, Const, Key, OtherTokenIds, SharedBias, TokenKey

# Gemma's decoder-layer names -> kvforge's (Llama's) names; export inverts it.
NORM_RENAMES = {
    "post_attention_layernorm": "attention_output_layernorm",
    "pre_feedforward_layernorm": "post_attention_layernorm",
}


@dataclass(frozen=True)
class GemmaLayerTypes:
    """``layer_types`` + ``sliding_window``; absent ``layer_types`` follow the config class's default."""

    sliding_every: int | None  # Gemma 2: None (alternate); Gemma 3: the default sliding_window_pattern

    def read(self, reader: ConfigReader, n_layers: int) -> list[int | None]:
        window = reader.get("sliding_window", int, TRANSFORMERS, nullable=True)
        layer_types = reader.get("layer_types", list, None, nullable=True)
        if layer_types is None:
            every = (
                2
                if self.sliding_every is None
                else reader.get("sliding_window_pattern", int, self.sliding_every)
            )
            layer_types = [SLIDING if (i + 1) % every else FULL for i in range(n_layers)]
        if len(layer_types) != n_layers or any(t not in (FULL, SLIDING) for t in layer_types):
            raise reader.error(
                f"layer_types={layer_types!r}: expected {n_layers} entries (num_hidden_layers), "
                f"each {FULL!r} or {SLIDING!r}"
            )
        if window is None and SLIDING in layer_types:
            raise reader.error("layer_types has sliding_attention layers but sliding_window is null")
        return [window if kind == SLIDING else None for kind in layer_types]

    def write(self, config: ModelConfig, hf: dict[str, Any]) -> None:
        window, _ = single_window(config)
        hf["sliding_window"] = window
        hf["layer_types"] = [SLIDING if spec.window is not None else FULL for spec in config.layers]

    def why_not(self, config: ModelConfig) -> str | None:
        return single_window(config)[1]


@dataclass(frozen=True)
class GemmaRecipe:
    """The traits a Gemma class always has, checked together so a refusal lists every one missing."""

    name: str  # "Gemma 2" / "Gemma 3"
    qk_norm: bool
    fields: tuple[str, ...] = ("norm_unit_offset", "sandwich_norms", "embed_scale", "qk_norm")

    def expected(self) -> dict[str, tuple[bool, str]]:
        return {
            "norm_unit_offset": (True, "RMSNorms that scale by 1 + weight (norm_unit_offset)"),
            "sandwich_norms": (True, "norms on the attention and MLP outputs (sandwich_norms)"),
            "embed_scale": (True, "embeddings scaled by sqrt(hidden_size) (embed_scale)"),
            "qk_norm": (
                self.qk_norm,
                "per-head q/k norms (qk_norm)" if self.qk_norm else "no q/k norm (qk_norm)",
            ),
        }

    def read(self, reader: ConfigReader, fields: dict[str, Any]) -> None:
        fields.update({name: value for name, (value, _) in self.expected().items()})

    def write(self, config: ModelConfig, hf: dict[str, Any]) -> None:
        pass

    def why_not(self, config: ModelConfig) -> str | None:
        missing = [what for name, (value, what) in self.expected().items() if getattr(config, name) != value]
        if not missing:
            return None
        return (
            f"{self.name} always has {'; '.join(missing)}, and this model does not. No choice of weights "
            "makes an RMSNorm the identity (nor adds one), and rewriting norm or embedding weights would not "
            "be bit-exact, so there is no exact export"
        )


@dataclass(frozen=True)
class QueryScale:
    """``query_pre_attn_scalar``: kvforge's None (head_dim's scale) is written as head_dim itself."""

    fields: tuple[str, ...] = ("query_pre_attn_scalar",)

    def read(self, reader: ConfigReader, fields: dict[str, Any]) -> None:
        fields["query_pre_attn_scalar"] = reader.get("query_pre_attn_scalar", int, TRANSFORMERS)

    def write(self, config: ModelConfig, hf: dict[str, Any]) -> None:
        hf["query_pre_attn_scalar"] = config.query_pre_attn_scalar or config.head_dim

    def why_not(self, config: ModelConfig) -> str | None:
        return None


@dataclass(frozen=True)
class Causal:
    """``use_bidirectional_attention`` must be off: kvforge decoders are causal."""

    off: bool | None  # how the config class spells "off" (Gemma 2: null, Gemma 3: false)
    fields: tuple[str, ...] = ()

    def read(self, reader: ConfigReader, fields: dict[str, Any]) -> None:
        if reader.get("use_bidirectional_attention", bool, None, nullable=True):
            raise reader.error(
                "use_bidirectional_attention=true (an embedding model that attends both ways) is not "
                "supported: kvforge decoders are causal (allowed: false or null)"
            )

    def write(self, config: ModelConfig, hf: dict[str, Any]) -> None:
        hf["use_bidirectional_attention"] = self.off

    def why_not(self, config: ModelConfig) -> str | None:
        return None


@dataclass(frozen=True)
class Gemma3AttnSoftcap:
    """Gemma 3 keeps ``attn_logit_softcapping`` in its config but never applies it (transformers)."""

    fields: tuple[str, ...] = ("attn_logit_softcap",)

    def read(self, reader: ConfigReader, fields: dict[str, Any]) -> None:
        cap = reader.get("attn_logit_softcapping", float, TRANSFORMERS, nullable=True)
        if cap is not None:
            raise reader.error(
                f"attn_logit_softcapping={cap}: transformers' Gemma3Attention does not apply it, so the "
                "model's intended attention is ambiguous; kvforge refuses to guess (allowed: null)"
            )
        fields["attn_logit_softcap"] = None

    def write(self, config: ModelConfig, hf: dict[str, Any]) -> None:
        hf["attn_logit_softcapping"] = None

    def why_not(self, config: ModelConfig) -> str | None:
        if config.attn_logit_softcap is not None:
            return (
                f"attn_logit_softcap={config.attn_logit_softcap} but Gemma 3 does not soft-cap attention "
                "scores (gemma2 does)"
            )
        return None


@dataclass(frozen=True)
class Gemma3Rope:
    """``rope_parameters = {full_attention: {...}, sliding_attention: {...}}`` (or the transformers-4 keys
    ``rope_theta``, ``rope_scaling`` for global layers and ``rope_local_base_freq`` for sliding ones),
    as ``Gemma3TextConfig.convert_rope_params_to_dict`` merges them."""

    fields: tuple[str, ...] = ("rope_theta", "rope_scaling", "window_rope_theta")

    def read(self, reader: ConfigReader, fields: dict[str, Any]) -> None:
        defaults = reader.defaults["rope_parameters"]  # the config class's, one entry per layer type
        nested = reader.get("rope_parameters", dict, None, nullable=True) or {}
        unknown = sorted(set(nested) - {FULL, SLIDING})
        if unknown:
            raise reader.error(
                f"rope_parameters has keys {unknown}: Gemma 3 keeps one entry per layer type "
                f"({FULL!r}, {SLIDING!r})"
            )
        full = dict(nested.get(FULL) or {"rope_type": "default"})
        full.update(reader.get("rope_scaling", dict, None, nullable=True) or {})
        full.setdefault("rope_theta", reader.get("rope_theta", float, defaults[FULL]["rope_theta"]))
        sliding = dict(nested.get(SLIDING) or {"rope_type": "default"})
        local = defaults[SLIDING]["rope_theta"]
        sliding.setdefault("rope_theta", reader.get("rope_local_base_freq", float, local))
        top = {k: v for k, v in reader.data.items() if k not in ("rope_parameters", "rope_scaling")}
        Rope().read(ConfigReader({**top, "rope_parameters": full}, reader.source), fields)
        local: dict[str, Any] = {"max_seq_len": fields["max_seq_len"]}
        Rope().read(ConfigReader({**top, "rope_parameters": sliding}, f"{reader.source} {SLIDING}"), local)
        if local["rope_scaling"] is not None:
            raise reader.error(
                f"rope_parameters.{SLIDING}.rope_type={sliding.get('rope_type')!r}: kvforge rotates sliding "
                "layers without scaling (allowed: 'default')"
            )
        fields["window_rope_theta"] = local["rope_theta"]

    def write(self, config: ModelConfig, hf: dict[str, Any]) -> None:
        scaling = _scaling_dict(config.rope_scaling)
        local = config.window_rope_theta or config.rope_theta
        hf["rope_parameters"] = {
            FULL: {"rope_type": "default", "rope_theta": config.rope_theta, **(scaling or {})},
            SLIDING: {"rope_type": "default", "rope_theta": local},
        }
        # The same values under the transformers-4 keys, which servers pinned to transformers 4.x
        # (vLLM, SGLang releases) read; transformers 5 merges them into rope_parameters unchanged.
        hf.update(rope_theta=config.rope_theta, rope_scaling=scaling, rope_local_base_freq=local)

    def why_not(self, config: ModelConfig) -> str | None:
        sliding = any(spec.window is not None for spec in config.layers)
        if config.window_rope_theta is None and config.rope_scaling is not None and sliding:
            return (
                "the sliding layers use rope_scaling but Gemma 3 rotates sliding layers without scaling "
                "(rope_parameters.sliding_attention is 'default')"
            )
        return None


def gemma_keys(*, bidirectional_off: bool | None) -> tuple[Codec, ...]:
    """What Gemma 2 and Gemma 3 text share."""
    return (
        *size_keys(),
        Key("head_dim", "head_dim", int, TRANSFORMERS),
        TokenKey("bos_token_id", "bos_token_id"),
        TokenKey("eos_token_id", "eos_token_id"),
        TokenKey("pad_token_id", "pad_token_id"),
        OtherTokenIds(),
        Key("hidden_activation", "mlp_activation", str, TRANSFORMERS),
        QueryScale(),
        Key("final_logit_softcapping", "final_logit_softcap", float, TRANSFORMERS, nullable=True),
        SharedBias(),
        Causal(bidirectional_off),
    )


GEMMA2 = StockFamily(
    "gemma2",
    "Gemma2ForCausalLM",
    (
        *gemma_keys(bidirectional_off=None),
        Key("attn_logit_softcapping", "attn_logit_softcap", float, TRANSFORMERS, nullable=True),
        GQALayers(GemmaLayerTypes(sliding_every=None)),
        Rope(),
        Const("window_rope_theta", None, "Gemma 2 rotates every layer with one RoPE base"),
        GemmaRecipe("Gemma 2", qk_norm=False),
    ),
    renames=NORM_RENAMES,
)

GEMMA3_TEXT = StockFamily(
    "gemma3_text",
    "Gemma3ForCausalLM",
    (
        *gemma_keys(bidirectional_off=False),
        Gemma3AttnSoftcap(),
        GQALayers(GemmaLayerTypes(sliding_every=6)),
        Gemma3Rope(),
        GemmaRecipe("Gemma 3", qk_norm=True),
    ),
    renames=NORM_RENAMES,
)
