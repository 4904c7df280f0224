"""kvforge-typed directories: any ``ModelConfig``, for forms no stock transformers class expresses.

config.json holds the whole ModelConfig under ``kvforge`` (kvforge reads it natively - no code runs)
plus the HF keys generation and tooling look at, and an ``auto_map`` to ``modeling_kvforge.py``
(copied next to the weights) for ``AutoModelForCausalLM.from_pretrained(..., trust_remote_code=True)``.
Parameter names are kvforge's, which are already the HF ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvforge.arch import ModelConfig

from .base import StateDict
from .schema import ConfigReader

MODELING_FILE = "modeling_kvforge.py"
AUTO_MAP = {
    "AutoConfig": "modeling_kvforge.KVForgeConfig",
    "AutoModelForCausalLM": "modeling_kvforge.KVForgeForCausalLM",
}
STOCK_WARNING = (
    "kvforge-typed export: stock transformers (without trust_remote_code), vLLM and SGLang will NOT load "
    "this directory. It loads with AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True) "
    "where kvforge is installed, and with kvforge.conversion.load_pretrained."
)


@dataclass(frozen=True)
class KVForgeFamily:
    model_type: str = "kvforge"
    architecture: str = "KVForgeForCausalLM"
    stock: bool = field(default=False, init=False)

    def read_config(self, reader: ConfigReader) -> ModelConfig:
        data = reader.get("kvforge", dict)
        try:
            return ModelConfig.from_dict(data)
        except (TypeError, ValueError) as err:
            raise reader.error(f"'kvforge' does not describe a valid ModelConfig: {err}") from None

    def why_not(self, config: ModelConfig) -> str | None:
        return None  # every kvforge model fits

    def write_config(self, config: ModelConfig) -> dict[str, Any]:
        return {
            "architectures": [self.architecture],
            "model_type": self.model_type,
            "auto_map": dict(AUTO_MAP),
            "vocab_size": config.vocab_size,
            "hidden_size": config.d_model,
            "num_hidden_layers": config.n_layers,
            "num_attention_heads": config.n_heads,
            "max_position_embeddings": config.max_seq_len,
            "tie_word_embeddings": config.tie_embeddings,
            "bos_token_id": config.bos_token_id,
            "eos_token_id": config.eos_token_id,
            "pad_token_id": config.pad_token_id,
            **config.special_token_ids,
            "kvforge": config.to_dict(),
        }

    def kvforge_name(self, hf_name: str) -> str:
        return hf_name  # kvforge-typed directories store kvforge's own names

    def hf_name(self, kvforge_name: str) -> str:
        return kvforge_name

    def notes(self, config: ModelConfig) -> list[str]:
        return [STOCK_WARNING]

    def extra_files(self) -> dict[str, str]:
        """Files written next to the weights: the HF wrapper around kvforge's own model."""
        source = Path(__file__).resolve().parents[1] / MODELING_FILE
        return {MODELING_FILE: source.read_text()}

    def to_kvforge(self, tensors: StateDict, config: ModelConfig, hf: dict[str, Any]) -> None:
        pass

    def to_hf(self, tensors: StateDict, config: ModelConfig, hf: dict[str, Any]) -> None:
        pass
