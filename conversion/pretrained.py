"""Read and write Hugging Face model directories as ``(ModelConfig, state_dict)``.

This first version covers the Llama family only; the per-family import/export tables
(Mistral, Qwen2, Qwen3, DeepSeek-V2/V3 and the kvforge-typed directory) extend it.
Weights are read with safetensors only; nothing here ever executes code from a checkpoint.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from kvforge.arch import ModelConfig

from .atomic import atomic_directory

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "generation_config.json",
)


@dataclass
class Pretrained:
    """A model read from disk: its config, its weights (kvforge/HF names) and where it came from."""

    config: ModelConfig
    state_dict: dict[str, torch.Tensor]
    family: str
    source: Path | None = None
    hf_config: dict = field(default_factory=dict)


def load_pretrained(path: str | Path) -> Pretrained:
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{path} is not a model directory: no config.json")
    hf = json.loads(config_file.read_text())
    model_type = hf.get("model_type")
    if model_type != "llama":
        raise ValueError(
            f"{config_file}: model_type={model_type!r} is not supported yet (supported: ['llama'])"
        )
    weights = path / "model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"{path}: no model.safetensors")
    rope = hf.get("rope_parameters") or {"rope_theta": hf.get("rope_theta", 10000.0)}
    config = ModelConfig(
        vocab_size=hf["vocab_size"],
        d_model=hf["hidden_size"],
        n_layers=hf["num_hidden_layers"],
        n_heads=hf["num_attention_heads"],
        n_kv_heads=hf.get("num_key_value_heads"),
        head_dim=hf.get("head_dim"),
        ffn_dim=hf["intermediate_size"],
        max_seq_len=hf["max_position_embeddings"],
        rope_theta=rope["rope_theta"],
        norm_eps=hf["rms_norm_eps"],
        tie_embeddings=hf.get("tie_word_embeddings", False),
        attention_bias=hf.get("attention_bias", False),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_id=hf.get("eos_token_id"),
        pad_token_id=hf.get("pad_token_id"),
    )
    state_dict = load_file(weights)
    if config.tie_embeddings:
        state_dict.setdefault("lm_head.weight", state_dict["model.embed_tokens.weight"])
    return Pretrained(config, state_dict, "llama", path, hf)


def save_pretrained(
    config: ModelConfig,
    state_dict: dict[str, torch.Tensor],
    out: str | Path,
    *,
    tokenizer_from: str | Path | None = None,
    overwrite: bool = False,
) -> Path:
    if any(spec.attention != "gqa" or spec.kv_from is not None or spec.window for spec in config.layers):
        raise ValueError("save_pretrained: only all-global GQA/MHA/MQA models export yet (as Llama)")
    if len({spec.n_kv_heads for spec in config.layers}) != 1:
        raise ValueError("save_pretrained: Llama needs the same n_kv_heads on every layer")
    hf = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": config.vocab_size,
        "hidden_size": config.d_model,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.layers[0].n_kv_heads,
        "head_dim": config.head_dim,
        "intermediate_size": config.ffn_dim,
        "max_position_embeddings": config.max_seq_len,
        "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_theta,
        "rope_parameters": {"rope_theta": config.rope_theta, "rope_type": "default"},
        "tie_word_embeddings": config.tie_embeddings,
        "attention_bias": config.attention_bias,
        "mlp_bias": False,
        "hidden_act": "silu",
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
        "pad_token_id": config.pad_token_id,
        "torch_dtype": str(next(iter(state_dict.values())).dtype).removeprefix("torch."),
    }
    tensors = {name: t.detach().contiguous().cpu() for name, t in state_dict.items()}
    if config.tie_embeddings:
        tensors.pop("lm_head.weight", None)
    with atomic_directory(out, overwrite=overwrite) as tmp:
        save_file(tensors, tmp / "model.safetensors", metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
        if tokenizer_from is not None:
            for name in TOKENIZER_FILES:
                if (Path(tokenizer_from) / name).is_file():
                    shutil.copy2(Path(tokenizer_from) / name, tmp / name)
    return Path(out)
