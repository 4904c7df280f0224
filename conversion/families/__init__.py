"""One table per Hugging Face family, used for import and export alike, and the choice of the stock
class an export goes to.

| family        | import | export | what it expresses                                            |
|---------------|--------|--------|--------------------------------------------------------------|
| llama         | yes    | yes    | GQA/MHA/MQA, global attention, optional attention_bias       |
| mistral       | yes    | yes    | the same with one sliding window on every layer              |
| qwen2         | yes    | yes    | q/k/v biases; per-layer windows (layer_types)                |
| qwen3         | yes    | yes    | q/k norm; per-layer windows (layer_types)                    |
| deepseek_v2   | yes    | yes    | MLA, dense MLP                                               |
| deepseek_v3   | yes    | yes    | MLA, dense MLP (the default target for MLA)                  |
| gemma2        | yes    | yes    | Gemma recipe, soft-capping, alternating windows (layer_types)|
| gemma3_text   | yes    | yes    | Gemma recipe, q/k norm, per-layer-type RoPE and windows      |
| kvforge       | yes    | yes    | anything else (needs trust_remote_code and kvforge installed)|
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kvforge.arch import ModelConfig

from .base import StockFamily
from .deepseek import DEEPSEEK_V2, DEEPSEEK_V3
from .gemma import GEMMA2, GEMMA3_TEXT
from .kvforge import KVForgeFamily
from .llama import LLAMA, MISTRAL
from .qwen import QWEN2, QWEN3
from .schema import ConfigReader

Family = StockFamily | KVForgeFamily
KVFORGE = KVForgeFamily()
FAMILIES: dict[str, Family] = {
    family.model_type: family
    for family in (LLAMA, MISTRAL, QWEN2, QWEN3, DEEPSEEK_V2, DEEPSEEK_V3, GEMMA2, GEMMA3_TEXT, KVFORGE)
}
# Automatic export picks the first stock family that can hold the model (simplest class first).
EXPORT_PREFERENCE = (LLAMA, MISTRAL, QWEN3, QWEN2, DEEPSEEK_V3, GEMMA3_TEXT, GEMMA2)
MOE_MODEL_TYPES = ("mixtral", "qwen2_moe", "qwen3_moe", "deepseek_moe", "olmoe", "dbrx", "jamba", "llama4")


def family_of(reader: ConfigReader) -> Family:
    """The family that reads this config.json; unknown, remote-code and MoE types are refused.

    A supported ``model_type`` is read with kvforge's own table even when the config also carries an
    ``auto_map`` (as transformers does without trust_remote_code): no checkpoint code ever runs."""
    model_type = reader.get("model_type", str)
    if model_type in FAMILIES:
        return FAMILIES[model_type]
    supported = sorted(FAMILIES)
    if "auto_map" in reader:
        raise reader.error(
            f"model_type={model_type!r} needs the checkpoint's own modeling code (auto_map); kvforge never "
            f"runs code from a checkpoint. Supported model types: {supported}"
        )
    if model_type == "gemma3":
        raise reader.error(
            "model_type='gemma3' is Gemma 3's multimodal wrapper; kvforge imports the text model "
            "(model_type 'gemma3_text', Gemma3ForCausalLM: the text_config with its language-model weights)"
        )
    if model_type in MOE_MODEL_TYPES:
        raise reader.error(
            f"model_type={model_type!r} is a mixture-of-experts family; kvforge imports dense models only. "
            f"Supported model types: {supported}"
        )
    raise reader.error(f"model_type={model_type!r} is not supported. Supported model types: {supported}")


@dataclass
class ExportPlan:
    """Where a model goes on export, and what the user should know about it."""

    family: Family
    notes: list[str] = field(default_factory=list)


def plan_export(config: ModelConfig, family: str | None = None) -> ExportPlan:
    """``family=None`` picks the simplest stock class that holds ``config``, else kvforge-typed;
    a named family must be able to hold it (the error says why not and which families can)."""
    if family is None:
        chosen = next((f for f in EXPORT_PREFERENCE if f.why_not(config) is None), KVFORGE)
        if chosen is KVFORGE:
            return ExportPlan(KVFORGE, [_no_stock_class(config), *KVFORGE.notes(config)])
    elif family not in FAMILIES:
        raise ValueError(
            f"family={family!r} is not a known family (allowed: {sorted(FAMILIES)} or None for automatic)"
        )
    else:
        chosen = FAMILIES[family]
        problem = chosen.why_not(config)
        if problem:
            able = [name for name, f in FAMILIES.items() if f.why_not(config) is None]
            raise ValueError(
                f"cannot export as {family}: {problem}. Families that can hold this model: {able}"
            )
    return ExportPlan(chosen, chosen.notes(config))


def _no_stock_class(config: ModelConfig) -> str:
    """Why every stock family refused, one line (families that refuse for the same reason grouped)."""
    reasons: dict[str, list[str]] = {}
    for family in EXPORT_PREFERENCE:
        reasons.setdefault(family.why_not(config), []).append(family.model_type)
    return (
        "no stock class holds this model ("
        + "; ".join(f"{', '.join(names)}: {why}" for why, names in reasons.items())
        + ")"
    )


__all__ = ["EXPORT_PREFERENCE", "FAMILIES", "KVFORGE", "ExportPlan", "Family", "family_of", "plan_export"]
