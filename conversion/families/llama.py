"""Llama and Mistral: GQA decoders without q/k norm; Mistral adds one sliding window for all layers.

An absent key takes the default of transformers' ``LlamaConfig``/``MistralConfig`` (``TRANSFORMERS``;
tests compare the tables with the pinned transformers). ``attention_bias`` biases q/k/v *and* o_proj
there.
"""

from __future__ import annotations

from .base import StockFamily
from .layers import GQALayers, NoWindows, UniformWindow
from .rope import Rope
from .schema import TRANSFORMERS, Codec, Const, Fixed, Key, OtherTokenIds, SharedBias, TokenKey


def size_keys() -> tuple[Codec, ...]:
    """Keys every family shares (Gemma too): sizes, norm eps, tying."""
    return (
        Key("vocab_size", "vocab_size", int),
        Key("hidden_size", "d_model", int),
        Key("num_hidden_layers", "n_layers", int),
        Key("num_attention_heads", "n_heads", int),
        Key("intermediate_size", "ffn_dim", int),
        Key("max_position_embeddings", "max_seq_len", int, TRANSFORMERS),
        Key("rms_norm_eps", "norm_eps", float, TRANSFORMERS),
        Key("tie_word_embeddings", "tie_embeddings", bool, TRANSFORMERS),
    )


def decoder_keys() -> tuple[Codec, ...]:
    """Keys every Llama-shaped family here shares: sizes, norm eps, tying, special ids, activation, RoPE."""
    return (
        *size_keys(),
        TokenKey("bos_token_id", "bos_token_id"),
        TokenKey("eos_token_id", "eos_token_id"),
        TokenKey("pad_token_id", "pad_token_id"),
        OtherTokenIds(),
        Fixed("hidden_act", "silu"),
        Rope(),
        *LLAMA_RECIPE,
    )


# What Gemma 2/3 add (kvforge.conversion.families.gemma), absent from every Llama-shaped family.
_NOT_GEMMA = "this family is a Llama-style decoder"
LLAMA_RECIPE: tuple[Codec, ...] = (
    Const("mlp_activation", "silu", f"{_NOT_GEMMA} (SwiGLU: hidden_act silu)"),
    Const("norm_unit_offset", False, f"{_NOT_GEMMA} (its RMSNorm scales by the weight, not 1 + weight)"),
    Const("sandwich_norms", False, f"{_NOT_GEMMA} (no norms on the attention/MLP outputs)"),
    Const("embed_scale", False, f"{_NOT_GEMMA} (embeddings are not scaled by sqrt(hidden_size))"),
    Const("query_pre_attn_scalar", None, f"{_NOT_GEMMA} (scores are scaled by head_dim^-1/2)"),
    Const("attn_logit_softcap", None, f"{_NOT_GEMMA} (no attention soft-capping)"),
    Const("final_logit_softcap", None, f"{_NOT_GEMMA} (no final-logit soft-capping)"),
    Const("window_rope_theta", None, f"{_NOT_GEMMA} (one RoPE base for every layer)"),
)


LLAMA = StockFamily(
    "llama",
    "LlamaForCausalLM",
    (
        *decoder_keys(),
        Key("head_dim", "head_dim", int, None, nullable=True),
        GQALayers(NoWindows()),
        SharedBias(),
        Fixed("mlp_bias", False),
        Const("qk_norm", False, "Llama has no q/k norm"),
    ),
)

MISTRAL = StockFamily(
    "mistral",
    "MistralForCausalLM",
    (
        *decoder_keys(),
        Key("head_dim", "head_dim", int, None, nullable=True),
        GQALayers(UniformWindow()),
        Const("attention_bias", False, "Mistral has no attention biases"),
        Const("o_proj_bias", False, "Mistral has no attention biases"),
        Const("qk_norm", False, "Mistral has no q/k norm"),
    ),
)
