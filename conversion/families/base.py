"""A family = one table used in both directions, plus the tensor layout changes it needs.

``read_config`` runs every table entry's ``read`` (config.json → ModelConfig fields), ``write_config``
every entry's ``write`` (ModelConfig → config.json), ``why_not`` asks every entry whether it can hold
the config. Parameter names are the same on both sides (kvforge uses the HF names); the few layouts
that differ are :class:`TensorLayout` objects whose export direction is the inverse of their import.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from huggingface_hub.errors import StrictDataclassError

from kvforge.arch import ModelConfig

from .schema import DERIVED_FROM, Codec, ConfigReader, Key, class_defaults

StateDict = dict[str, torch.Tensor]

# Keys that mean the tensors are not plain floating-point weights kvforge can run.
REFUSED_KEYS = {
    "quantization_config": "quantized checkpoints are not supported; export an unquantized (bf16/fp16/fp32) copy",
}


class TensorLayout(Protocol):
    """A difference between how a family stores some tensors and how kvforge does."""

    def to_kvforge(self, tensors: StateDict, config: ModelConfig) -> None: ...

    def to_hf(self, tensors: StateDict, config: ModelConfig) -> None: ...


@dataclass(frozen=True)
class RowPermutation:
    """Reorders dim 0 of the tensors whose names end with ``suffixes``; export applies the inverse
    order (``argsort``), so the two directions cannot drift apart."""

    suffixes: tuple[str, ...]
    rows: Callable[[ModelConfig, str, int], torch.Tensor]  # (config, name, n_rows) -> permutation

    def _apply(self, tensors: StateDict, config: ModelConfig, inverse: bool) -> None:
        for name in [n for n in tensors if n.endswith(self.suffixes)]:
            order = self.rows(config, name, tensors[name].shape[0])
            tensors[name] = tensors[name][torch.argsort(order) if inverse else order]

    def to_kvforge(self, tensors: StateDict, config: ModelConfig) -> None:
        self._apply(tensors, config, inverse=False)

    def to_hf(self, tensors: StateDict, config: ModelConfig) -> None:
        self._apply(tensors, config, inverse=True)


def rename_layer_leaves(tensors: StateDict, renames: dict[str, str]) -> None:
    """Rename ``model.layers.N.<leaf>.…`` by ``renames[leaf]`` in place, all names at once (so a rename
    may reuse a name another one frees, as Gemma's norms do)."""
    if not renames or not any(_renamed(name, renames) != name for name in tensors):
        return
    renamed = {_renamed(name, renames): tensor for name, tensor in tensors.items()}
    tensors.clear()
    tensors.update(renamed)


def _renamed(name: str, renames: dict[str, str]) -> str:
    parts = name.split(".")
    if len(parts) > 3 and parts[0] == "model" and parts[1] == "layers" and parts[3] in renames:
        parts[3] = renames[parts[3]]
        return ".".join(parts)
    return name


@dataclass(frozen=True)
class StockFamily:
    """A stock transformers class: AutoModelForCausalLM, vLLM and SGLang load it without remote code."""

    model_type: str
    architecture: str
    table: Sequence[Codec]
    layouts: Callable[[dict[str, Any]], Sequence[TensorLayout]] = lambda hf: ()
    notes: Callable[[ModelConfig], list[str]] = lambda config: []
    # Per-layer module names that differ: {HF name: kvforge name}, e.g. Gemma's post_attention_layernorm
    # (after attention) is kvforge's attention_output_layernorm. A bijection: export inverts it.
    renames: dict[str, str] = field(default_factory=dict)
    stock: bool = field(default=True, init=False)

    def kvforge_name(self, hf_name: str) -> str:
        return _renamed(hf_name, self.renames)

    def hf_name(self, kvforge_name: str) -> str:
        return _renamed(kvforge_name, {kv: hf for hf, kv in self.renames.items()})

    @property
    def fields(self) -> set[str]:
        """ModelConfig fields this family's table decides (tests check none is forgotten)."""
        return {name for entry in self.table for name in entry.fields}

    def read_config(self, reader: ConfigReader) -> ModelConfig:
        for key, why in REFUSED_KEYS.items():
            if reader.data.get(key):
                raise reader.error(f"{key} is set: {why}")
        try:
            defaults = class_defaults(self.model_type, reader.data)
        except (ValueError, TypeError, StrictDataclassError) as err:  # its own validation of the sizes
            why = " ".join(str(err).split())
            given = ", ".join(f"{key}={reader.data[key]!r}" for key in DERIVED_FROM if key in reader.data)
            raise reader.error(
                f"refused by transformers' {self.model_type} config ({given}): {why}"
            ) from None
        reader = ConfigReader(reader.data, reader.source, defaults)
        fields: dict[str, Any] = {}
        for entry in self.table:
            entry.read(reader, fields)
        try:
            return ModelConfig(**fields)
        except ValueError as err:  # it names ModelConfig's fields: add the keys they were read from
            keys = [
                f"{entry.hf}={reader.data[entry.hf]!r}"
                for entry in self.table
                if isinstance(entry, Key)
                and entry.hf in reader.data
                and re.search(rf"\b{entry.field}\b", str(err))
            ]
            read_from = f" (read from {', '.join(keys)})" if keys else ""
            raise reader.error(f"describes an invalid {self.model_type} model: {err}{read_from}") from None

    def why_not(self, config: ModelConfig) -> str | None:
        for entry in self.table:
            problem = entry.why_not(config)
            if problem:
                return problem
        return None

    def write_config(self, config: ModelConfig) -> dict[str, Any]:
        problem = self.why_not(config)
        if problem:
            raise ValueError(f"cannot export as {self.model_type}: {problem}")
        hf: dict[str, Any] = {"architectures": [self.architecture], "model_type": self.model_type}
        for entry in self.table:
            entry.write(config, hf)
        return hf

    def extra_files(self) -> dict[str, str]:
        return {}

    def to_kvforge(self, tensors: StateDict, config: ModelConfig, hf: dict[str, Any]) -> None:
        rename_layer_leaves(tensors, self.renames)
        for layout in self.layouts(hf):
            layout.to_kvforge(tensors, config)

    def to_hf(self, tensors: StateDict, config: ModelConfig, hf: dict[str, Any]) -> None:
        for layout in self.layouts(hf):
            layout.to_hf(tensors, config)
        rename_layer_leaves(tensors, {kv: hf_name for hf_name, kv in self.renames.items()})
