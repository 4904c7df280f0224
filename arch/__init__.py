"""Model architecture: config, attention blocks, decoder, KV cache and KV-bytes accounting.
Depends on torch and :mod:`kvforge.kernels` only."""

from .cache import ChunkLayerCache, DenseLayerCache, KVCache, KVView, RingLayerCache
from .config import LayerSpec, ModelConfig, RopeScaling
from .flops import flops_per_token, forward_flops_per_token
from .form_record import AttentionForm, Rotary
from .forms import ATTENTION_FORMS, register_form
from .generate import generate, sample_next
from .kv_bytes import describe_layers, kv_bytes_per_token, kv_cache_bytes, mha_equivalent, parse_dtype
from .model import CausalLM, Decoder, DecoderLayer
from .static_decode import StaticDecoder

__all__ = [
    "ATTENTION_FORMS",
    "AttentionForm",
    "CausalLM",
    "ChunkLayerCache",
    "Decoder",
    "DecoderLayer",
    "DenseLayerCache",
    "KVCache",
    "KVView",
    "LayerSpec",
    "ModelConfig",
    "RingLayerCache",
    "RopeScaling",
    "Rotary",
    "StaticDecoder",
    "describe_layers",
    "flops_per_token",
    "forward_flops_per_token",
    "generate",
    "kv_bytes_per_token",
    "kv_cache_bytes",
    "mha_equivalent",
    "parse_dtype",
    "register_form",
    "sample_next",
]
