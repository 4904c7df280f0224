"""Check an exported directory against what vLLM's model loaders read, where no vLLM/SGLang can run.

    lint_serving("exported_dir")  ->  [Finding("error", "rope_interleave", "..."), ...]

The known ways a converted model fails on a serving engine, each one check (TransMLA#24, #32):
- the architecture is not a class the engine registers (``LlamaMLAForCausalLM``): "not recognised";
- the model needs its own modeling code (``auto_map``, engine-internal plugins that break between
  releases: TransMLA#32's ``MLACommonImpl.__init__() got an unexpected keyword argument 'rotary_emb'``);
- it loads and answers with garbage: for DeepSeek MLA, whatever transformers does differently from
  vLLM's ``deepseek_v2.py`` (read for these checks): vLLM rotates interleaved pairs
  (``is_neox_style=False``) whatever ``rope_interleave`` says; it turns any non-default RoPE into
  DeepSeek YaRN; it builds every projection without a bias and skips bias tensors; its ``lm_head`` is
  never tied to the embeddings; a layer is MoE when ``n_routed_experts`` is set and the layer index is at
  least ``first_k_dense_replace`` (transformers' DeepseekV3 defaults: 256 experts from layer 3), and its
  weight loader adds ``n_routed_experts`` to a number, so null fails at load;
- the MLA sizes in config.json do not match the weights (shapes read from the safetensors headers).

SGLang's DeepSeek loader reads the same keys; it was not run or read here. These are config checks,
not a serving run: docs say so.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .checkpoint import checkpoint_entries

# Classes vLLM and SGLang register for the families kvforge exports (transformers names).
SERVED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Gemma2ForCausalLM": "gemma2",
    "Gemma3ForCausalLM": "gemma3_text",
    "DeepseekV2ForCausalLM": "deepseek_v2",
    "DeepseekV3ForCausalLM": "deepseek_v3",
}
DEEPSEEK = ("deepseek_v2", "deepseek_v3")
DEEPSEEK_V3_DEFAULTS = {"n_routed_experts": 256, "first_k_dense_replace": 3, "rope_interleave": True}


@dataclass(frozen=True)
class Finding:
    level: str  # "error": the engine fails or computes something else; "warning": small numeric differences
    key: str
    message: str

    def __str__(self) -> str:
        return f"{self.level}: {self.key}: {self.message}"


Check = Callable[[dict, dict[str, tuple[int, ...]]], list[Finding]]


def lint_serving(directory: str | Path) -> list[Finding]:
    """Every finding for the model directory ``directory`` (config.json + safetensors headers)."""
    directory = Path(directory)
    hf = json.loads((directory / "config.json").read_text())
    shapes = {name: entry.shape for name, entry in checkpoint_entries(directory).items()}
    return lint_config(hf, shapes)


def lint_config(hf: dict, shapes: dict[str, tuple[int, ...]]) -> list[Finding]:
    findings = []
    for check in CHECKS:
        findings.extend(check(hf, shapes))
    return findings


def _stock_architecture(hf: dict, shapes) -> list[Finding]:
    architectures = hf.get("architectures") or []
    if len(architectures) != 1 or architectures[0] not in SERVED_ARCHITECTURES:
        return [
            Finding(
                "error",
                "architectures",
                f"{architectures} is not a class vLLM/SGLang register (they would not recognise the model); "
                f"served classes: {sorted(SERVED_ARCHITECTURES)}",
            )
        ]
    expected = SERVED_ARCHITECTURES[architectures[0]]
    if hf.get("model_type") != expected:
        return [
            Finding(
                "error",
                "model_type",
                f"{hf.get('model_type')!r} does not match {architectures[0]} ({expected!r})",
            )
        ]
    return []


def _no_remote_code(hf: dict, shapes) -> list[Finding]:
    if "auto_map" in hf:
        return [
            Finding(
                "error",
                "auto_map",
                f"{hf['auto_map']}: the model needs its own modeling code; engines run their own implementation "
                "of a registered class, and plugin code breaks with engine releases",
            )
        ]
    return []


def _deepseek_only(check: Check) -> Check:
    def wrapped(hf: dict, shapes) -> list[Finding]:
        return check(hf, shapes) if hf.get("model_type") in DEEPSEEK else []

    return wrapped


def _get(hf: dict, key: str):
    default = DEEPSEEK_V3_DEFAULTS.get(key) if hf.get("model_type") == "deepseek_v3" else None
    return hf.get(key, default)


@_deepseek_only
def _dense_mlp(hf: dict, shapes) -> list[Finding]:
    findings = []
    experts, first_dense = _get(hf, "n_routed_experts"), _get(hf, "first_k_dense_replace")
    layers = hf.get("num_hidden_layers", 0)
    if experts is None:
        findings.append(
            Finding(
                "error",
                "n_routed_experts",
                "null: vLLM's DeepSeek weight loader adds it to a number and fails",
            )
        )
    elif first_dense is None or first_dense < layers:
        moe = [
            index for index in range(first_dense or 0, layers) if index % (hf.get("moe_layer_freq") or 1) == 0
        ]
        missing = not any(".mlp.experts." in name for name in shapes)
        findings.append(
            Finding(
                "error",
                "first_k_dense_replace",
                f"{first_dense} < num_hidden_layers={layers}: layers {moe[:8]} are built as MoE with "
                f"{experts} experts{' whose weights the checkpoint does not have' if missing else ''}; "
                "a dense model needs first_k_dense_replace >= num_hidden_layers",
            )
        )
    return findings


@_deepseek_only
def _rope(hf: dict, shapes) -> list[Finding]:
    findings = []
    if hf.get("model_type") == "deepseek_v3" and not _get(hf, "rope_interleave"):
        findings.append(
            Finding(
                "error",
                "rope_interleave",
                "false (rotary rows in halves): vLLM/SGLang rotate interleaved pairs whatever this says, so the "
                "served model computes other attention scores (export with rope_interleave true)",
            )
        )
    scaling = hf.get("rope_scaling") or {}
    parameters = hf.get("rope_parameters") or {}
    rope_type = parameters.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if rope_type not in ("default", "yarn"):
        findings.append(
            Finding(
                "error",
                "rope_scaling",
                f"rope_type {rope_type!r}: vLLM runs every non-default type as DeepSeek YaRN",
            )
        )
    return findings


@_deepseek_only
def _untied_head(hf: dict, shapes) -> list[Finding]:
    if hf.get("tie_word_embeddings") or "lm_head.weight" not in shapes:
        return [
            Finding(
                "error",
                "tie_word_embeddings",
                "the head is tied (no lm_head.weight): vLLM's DeepSeek lm_head is never tied and stays uninitialised",
            )
        ]
    return []


@_deepseek_only
def _no_biases(hf: dict, shapes) -> list[Finding]:
    biases = sorted(name for name in shapes if name.endswith(".bias") and ".self_attn." in name)
    if hf.get("attention_bias") or biases:
        return [
            Finding(
                "error",
                "attention_bias",
                f"attention biases {biases[:3]}: vLLM builds DeepSeek attention without biases and skips them",
            )
        ]
    return []


@_deepseek_only
def _mla_sizes(hf: dict, shapes) -> list[Finding]:
    keys = ("kv_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim", "num_attention_heads")
    missing = [key for key in keys if not isinstance(hf.get(key), int)]
    if missing:
        return [Finding("error", missing[0], f"MLA sizes {missing} must be integers in config.json")]
    heads, rope, nope, v_dim = (
        hf[k] for k in ("num_attention_heads", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim")
    )
    expected = {
        "self_attn.kv_a_proj_with_mqa.weight": hf["kv_lora_rank"] + rope,
        "self_attn.kv_b_proj.weight": heads * (nope + v_dim),
        "self_attn.q_b_proj.weight" if hf.get("q_lora_rank") else "self_attn.q_proj.weight": heads
        * (nope + rope),
        "self_attn.o_proj.weight": hf.get("hidden_size"),
    }
    findings = []
    for suffix, rows in expected.items():
        name = f"model.layers.0.{suffix}"
        if name not in shapes:
            findings.append(Finding("error", suffix, f"{name} is missing; the config's MLA layout needs it"))
        elif shapes[name][0] != rows:
            findings.append(
                Finding(
                    "error", suffix, f"{name} has {shapes[name][0]} rows; the config's MLA sizes imply {rows}"
                )
            )
    if hf.get("num_key_value_heads", heads) != heads:
        findings.append(
            Finding("error", "num_key_value_heads", f"must equal num_attention_heads={heads} for MLA")
        )
    return findings


@_deepseek_only
def _latent_norm_eps(hf: dict, shapes) -> list[Finding]:
    eps = hf.get("rms_norm_eps", 1e-6)
    if eps != 1e-6:
        return [
            Finding(
                "warning",
                "rms_norm_eps",
                f"{eps}: vLLM normalises the MLA latent with it, transformers with 1e-6: logits differ slightly",
            )
        ]
    return []


CHECKS: tuple[Check, ...] = (
    _stock_architecture,
    _no_remote_code,
    _dense_mlp,
    _rope,
    _untied_head,
    _no_biases,
    _mla_sizes,
    _latent_norm_eps,
)
