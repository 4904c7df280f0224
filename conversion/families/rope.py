"""RoPE settings: config.json ``rope_parameters`` (transformers 5) or ``rope_theta`` + ``rope_scaling``
(transformers 4) ↔ ``ModelConfig.rope_theta`` + :class:`~kvforge.arch.RopeScaling`.

Reading follows transformers' ``convert_rope_params_to_dict``/``standardize_rope_params``: a
non-empty legacy ``rope_scaling`` wins over ``rope_parameters``; ``rope_theta`` inside the dict wins
over the top-level key; ``original_max_position_embeddings`` falls back to the top-level key, then to
``max_position_embeddings``; a yarn ``factor`` of null means max/original length. Export writes both
spellings with the same content, so transformers 4 and 5 (and servers built on either) read it alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kvforge.arch import ModelConfig, RopeScaling

from .schema import REQUIRED, ConfigReader

SCALED_TYPES = ("linear", "llama3", "yarn")


@dataclass(frozen=True)
class Rope:
    fields: tuple[str, ...] = ("rope_theta", "rope_scaling")

    def read(self, reader: ConfigReader, fields: dict[str, Any]) -> None:
        key = "rope_scaling" if reader.data.get("rope_scaling") else "rope_parameters"
        raw = reader.data.get(key) or {}
        if not isinstance(raw, dict):
            raise reader.error(f"{key}={raw!r}: expected an object")
        params = ConfigReader(raw, f"{reader.source} {key}")
        if "rope_theta" in params:  # inside the dict it wins over the top-level key
            fields["rope_theta"] = params.get("rope_theta", float)
        else:  # absent everywhere: the config class's default
            default = (reader.defaults.get("rope_parameters") or {}).get("rope_theta", REQUIRED)
            fields["rope_theta"] = reader.get("rope_theta", float, default)
        partial = params.get("partial_rotary_factor", float, reader.get("partial_rotary_factor", float, 1.0))
        if partial != 1.0:
            raise reader.error(
                f"partial_rotary_factor={partial} is not supported: kvforge rotates the whole head (1.0)"
            )
        rope_type = params.get("rope_type", str, params.get("type", str, "default"))
        if rope_type == "default":
            fields["rope_scaling"] = None
            return
        if rope_type not in SCALED_TYPES:
            raise reader.error(
                f"rope_type={rope_type!r} is not supported (supported: ['default', {', '.join(map(repr, SCALED_TYPES))}])"
            )
        fields["rope_scaling"] = _read_scaling(rope_type, params, reader, fields["max_seq_len"])

    def write(self, config: ModelConfig, hf: dict[str, Any]) -> None:
        scaling = _scaling_dict(config.rope_scaling)
        hf["rope_theta"] = config.rope_theta
        hf["rope_scaling"] = scaling
        hf["rope_parameters"] = {"rope_type": "default", "rope_theta": config.rope_theta, **(scaling or {})}

    def why_not(self, config: ModelConfig) -> str | None:
        return None


def _read_scaling(rope_type: str, params: ConfigReader, top: ConfigReader, max_seq_len: int) -> RopeScaling:
    original = params.get(
        "original_max_position_embeddings",
        int,
        top.get("original_max_position_embeddings", int, max_seq_len),
    )
    if rope_type == "linear":
        return RopeScaling("linear", params.get("factor", float))
    if rope_type == "llama3":
        return RopeScaling(
            "llama3",
            params.get("factor", float),
            original_max_seq_len=original,
            low_freq_factor=params.get("low_freq_factor", float),
            high_freq_factor=params.get("high_freq_factor", float),
        )
    factor = params.get("factor", float, None, nullable=True)
    return RopeScaling(
        "yarn",
        factor if factor is not None else max_seq_len / original,
        original_max_seq_len=original,
        # transformers reads these with `or 32` / `or 1`: a null or 0 means the paper's default
        beta_fast=params.get("beta_fast", float, None, nullable=True) or 32.0,
        beta_slow=params.get("beta_slow", float, None, nullable=True) or 1.0,
        mscale=params.get("mscale", float, None, nullable=True),
        mscale_all_dim=params.get("mscale_all_dim", float, None, nullable=True),
        attention_factor=params.get("attention_factor", float, None, nullable=True),
        truncate=params.get("truncate", bool, True),
    )


def _scaling_dict(scaling: RopeScaling | None) -> dict[str, Any] | None:
    """The config.json form of a scaling (``rope_type`` plus the keys that type reads)."""
    if scaling is None:
        return None
    out: dict[str, Any] = {"rope_type": scaling.type, "factor": scaling.factor}
    if scaling.type == "llama3":
        out.update(
            original_max_position_embeddings=scaling.original_max_seq_len,
            low_freq_factor=scaling.low_freq_factor,
            high_freq_factor=scaling.high_freq_factor,
        )
    elif scaling.type == "yarn":
        out.update(
            original_max_position_embeddings=scaling.original_max_seq_len,
            beta_fast=scaling.beta_fast,
            beta_slow=scaling.beta_slow,
        )
        for optional in ("mscale", "mscale_all_dim", "attention_factor"):
            if getattr(scaling, optional) is not None:
                out[optional] = getattr(scaling, optional)
        if not scaling.truncate:
            out["truncate"] = False
    return out
