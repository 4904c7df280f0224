"""Stock transformers models with the sizes of a kvforge config (the same parameter names, so
``load_state_dict(kvforge_model.state_dict())`` gives both the same weights): the baselines that the
benchmarks measure in the same run. Their config is the one ``kvforge export`` writes: the family
tables' (``kvforge.conversion.families``), never a hand-built copy."""

from __future__ import annotations

import torch
import transformers

from kvforge.arch import ModelConfig
from kvforge.conversion import plan_export


def build_stock(
    config: ModelConfig,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    attn: str = "sdpa",
):
    """The transformers model of the simplest stock class that holds ``config`` (Llama for GQA/MHA/MQA,
    DeepseekV3 for MLA); a config no stock class holds is an error saying why."""
    family = plan_export(config, None).family
    if not family.stock:
        raise ValueError(f"no stock transformers class holds this config: {plan_export(config).notes}")
    fields = family.write_config(config)
    if (
        "rope_interleave" in fields
    ):  # DeepseekV3: rotate halves, as kvforge does, so its state dict loads as is
        fields["rope_interleave"] = False
    hf_config = transformers.AutoConfig.for_model(fields.pop("model_type"), **fields)
    hf_config._attn_implementation = attn
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(hf_config)
    return model.to(dtype)
