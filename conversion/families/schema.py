"""The vocabulary of the family tables: typed config.json keys and the reader that checks them.

A :class:`Key` ties one config.json key to one :class:`~kvforge.arch.ModelConfig` field with the same
meaning in both directions; import reads it (type-checked; an absent key takes the default of the
transformers config class, :func:`class_defaults`, so the tables restate none of them) and export
writes the field back under the same key. :class:`Const` states
what a family implies about a field (Qwen3: ``qk_norm`` is always on); export refuses a config
whose field differs. Anything richer (per-layer windows, RoPE, MLA sizes) is a codec object with the
same three methods: ``read``, ``write`` and ``why_not``.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import transformers

from kvforge.arch import ModelConfig

REQUIRED: Any = object()  # marks a key without a default: absent means the config is unusable
TRANSFORMERS: Any = object()  # an absent key takes the transformers config class's default
# Raw config.json values the config classes derive other defaults from (head_dim, num_key_value_heads,
# sliding_window); sizes that allocate per layer are not passed, so a hostile config allocates nothing.
DERIVED_FROM = {"hidden_size": int, "num_attention_heads": int, "use_sliding_window": bool}


def class_defaults(model_type: str, data: Mapping[str, Any]) -> dict[str, Any]:
    """``AutoConfig.for_model(model_type, **raw)``'s values, for the stock families' model types only
    (no checkpoint code runs), with ``raw`` limited to :data:`DERIVED_FROM` of valid type."""
    raw = tuple(
        (key, data[key])
        for key, kind in DERIVED_FROM.items()
        if _is_kind(data.get(key), kind) and (kind is bool or data[key] > 0)
    )
    return copy.deepcopy(_class_defaults(model_type, raw))


@functools.lru_cache(maxsize=64)
def _class_defaults(model_type: str, raw: tuple[tuple[str, Any], ...]) -> dict[str, Any]:
    return transformers.AutoConfig.for_model(model_type, **dict(raw)).to_dict()


KIND_NAMES = {
    int: "an integer",
    float: "a number",
    bool: "true or false",
    str: "a string",
    list: "a list",
    dict: "an object",
}


class ConfigReader:
    """Typed access to one config.json; every error names the file, the key and what is allowed."""

    def __init__(
        self, data: dict[str, Any], source: str | Path, defaults: Mapping[str, Any] | None = None
    ) -> None:
        if not isinstance(data, dict):
            raise ValueError(f"{source}: expected a JSON object, got {type(data).__name__}")
        self.data = data
        self.source = str(source)
        self.defaults = dict(defaults or {})  # the transformers config class's values (TRANSFORMERS)

    def default(self, key: str, default: Any) -> Any:
        """``default``, or with :data:`TRANSFORMERS` the config class's value of ``key``."""
        if default is not TRANSFORMERS:
            return default
        if key not in self.defaults:
            raise self.error(f"missing key {key!r}, which has no transformers default here")
        return self.defaults[key]

    def __contains__(self, key: str) -> bool:
        return key in self.data

    def error(self, message: str) -> ValueError:
        return ValueError(f"{self.source}: {message}")

    def get(self, key: str, kind: type, default: Any = REQUIRED, nullable: bool = False) -> Any:
        if key not in self.data:
            if default is REQUIRED:
                raise self.error(f"missing required key {key!r} ({KIND_NAMES[kind]})")
            return self.default(key, default)
        value = self.data[key]
        if value is None and nullable:
            return None
        if not _is_kind(value, kind):
            allowed = KIND_NAMES[kind] + (" or null" if nullable else "")
            raise self.error(f"{key}={value!r} has the wrong type: expected {allowed}")
        return float(value) if kind is float else value

    def token_ids(self, key: str, default: Any) -> int | list[int] | None:
        """bos/eos/pad ids: an id, a list of ids (Llama-3's several EOS tokens) or null."""
        value = self.data[key] if key in self.data else self.default(key, default)
        if value is None or _is_kind(value, int):
            return value
        if isinstance(value, list) and value and all(_is_kind(v, int) for v in value):
            return list(value)
        raise self.error(f"{key}={value!r} has the wrong type: expected a token id, a list of ids or null")


def _is_kind(value: Any, kind: type) -> bool:
    if kind is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


@dataclass(frozen=True)
class Key:
    """config.json ``hf`` ↔ ``ModelConfig.<field>``, the same value both ways."""

    hf: str
    field: str
    kind: type
    default: Any = REQUIRED  # or TRANSFORMERS: the config class's default
    nullable: bool = False

    @property
    def fields(self) -> tuple[str, ...]:
        return (self.field,)

    def read(self, reader: ConfigReader, fields: dict[str, Any]) -> None:
        fields[self.field] = reader.get(self.hf, self.kind, self.default, self.nullable)

    def write(self, config: ModelConfig, hf: dict[str, Any]) -> None:
        hf[self.hf] = getattr(config, self.field)

    def why_not(self, config: ModelConfig) -> str | None:
        return None


@dataclass(frozen=True)
class TokenKey(Key):
    """A bos/eos/pad id key (an id, a list of ids or null)."""

    kind: type = int
    nullable: bool = True
    default: Any = TRANSFORMERS

    def read(self, reader: ConfigReader, fields: dict[str, Any]) -> None:
        fields[self.field] = reader.token_ids(self.hf, self.default)


@dataclass(frozen=True)
class OtherTokenIds:
    """Every ``*_token_id`` key of config.json besides bos/eos/pad (``unk_token_id``, ``sep_token_id``,
    ...): read as they are into ``ModelConfig.special_token_ids`` and written back, so an export keeps
    what it read."""

    handled: tuple[str, ...] = ("bos_token_id", "eos_token_id", "pad_token_id")
    fields: tuple[str, ...] = ("special_token_ids",)

    def read(self, reader: ConfigReader, fields: dict[str, Any]) -> None:
        fields["special_token_ids"] = {
            key: reader.token_ids(key, None)
            for key in sorted(reader.data)
            if key.endswith("_token_id") and key not in self.handled
        }

    def write(self, config: ModelConfig, hf: dict[str, Any]) -> None:
        for key, value in config.special_token_ids.items():
            hf.setdefault(key, value)

    def why_not(self, config: ModelConfig) -> str | None:
        return None


@dataclass(frozen=True)
class Const:
    """This family always has ``ModelConfig.<field> == value`` (no config.json key carries it)."""

    field: str
    value: Any
    reason: str

    @property
    def fields(self) -> tuple[str, ...]:
        return (self.field,)

    def read(self, reader: ConfigReader, fields: dict[str, Any]) -> None:
        fields[self.field] = self.value

    def write(self, config: ModelConfig, hf: dict[str, Any]) -> None:
        pass

    def why_not(self, config: ModelConfig) -> str | None:
        value = getattr(config, self.field)
        if value != self.value:
            return f"{self.field}={value!r} but {self.reason} (needs {self.field}={self.value!r})"
        return None


@dataclass(frozen=True)
class Fixed:
    """A config.json key whose only supported value is ``value`` (e.g. ``hidden_act: silu``): import
    refuses anything else, export writes it. An absent key reads as ``value``, which is also the
    transformers default of every such key in these families."""

    hf: str
    value: Any
    fields: tuple[str, ...] = ()

    def read(self, reader: ConfigReader, fields: dict[str, Any]) -> None:
        value = reader.data.get(self.hf, self.value)
        if value != self.value:
            raise reader.error(
                f"{self.hf}={value!r} is not supported: kvforge models have {self.hf}={self.value!r}"
            )

    def write(self, config: ModelConfig, hf: dict[str, Any]) -> None:
        hf[self.hf] = self.value

    def why_not(self, config: ModelConfig) -> str | None:
        return None


class Codec(Protocol):
    """One entry of a family table: how some config.json keys and ModelConfig fields correspond."""

    fields: tuple[str, ...]

    def read(self, reader: ConfigReader, fields: dict[str, Any]) -> None: ...

    def write(self, config: ModelConfig, hf: dict[str, Any]) -> None: ...

    def why_not(self, config: ModelConfig) -> str | None: ...


@dataclass(frozen=True)
class SharedBias:
    """Llama/Qwen3/DeepSeek: one flag biases the input projections *and* ``o_proj``."""

    hf: str = "attention_bias"
    default: Any = TRANSFORMERS
    fields: tuple[str, ...] = ("attention_bias", "o_proj_bias")

    def read(self, reader: ConfigReader, fields: dict[str, Any]) -> None:
        fields["attention_bias"] = fields["o_proj_bias"] = reader.get(self.hf, bool, self.default)

    def write(self, config: ModelConfig, hf: dict[str, Any]) -> None:
        hf[self.hf] = config.attention_bias

    def why_not(self, config: ModelConfig) -> str | None:
        if config.attention_bias != config.o_proj_bias:
            return (
                f"attention_bias={config.attention_bias} but o_proj_bias={config.o_proj_bias}; "
                f"this family's `{self.hf}` biases both or neither"
            )
        return None
