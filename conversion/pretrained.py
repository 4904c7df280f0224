"""Read and write Hugging Face model directories as ``(ModelConfig, state_dict)``.

Import reads config.json through the family table of its ``model_type`` (see
:mod:`kvforge.conversion.families`), the weights with safetensors (pickle only on request, via
``torch.load(weights_only=True)``), undoes the family's tensor layout where it differs from kvforge's,
and checks every tensor name and shape against the model the config describes. Export goes the
other way into a stock class when one can hold the model (else a kvforge-typed directory), written
atomically with its tokenizer files and generation config. Nothing here executes checkpoint code.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from kvforge.arch import ModelConfig, parse_dtype

from .atomic import atomic_directory
from .checkpoint import EMBEDDINGS, LM_HEAD, check_config_sizes, check_tensors
from .config_bounds import check_config_bounds
from .families import Family, family_of, plan_export
from .families.schema import ConfigReader
from .streamed_write import source_meta, write_streamed
from .weights import JSON_ERRORS, read_weights

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
    "kvforge_provenance.json",  # where the weights came from (a GGUF import); travels with them
)
log = logging.getLogger(__name__)


@dataclass
class Pretrained:
    """A model read from disk: its config, its weights (kvforge/HF names) and where it came from."""

    config: ModelConfig
    state_dict: dict[str, torch.Tensor]
    family: str
    source: Path | None = None
    hf_config: dict = field(default_factory=dict)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except JSON_ERRORS as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None


def load_config(path: str | Path, weights: Mapping | None = None) -> tuple[ModelConfig, Family, dict]:
    """The model a directory describes, without reading its weights: (config, family, raw config.json).
    ``weights`` (the tensor headers, :func:`~kvforge.conversion.checkpoint.checkpoint_entries`): the
    config's sizes are checked against them before anything is built from the config."""
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{path} is not a model directory: no config.json")
    hf = _read_json(config_file)
    if not isinstance(hf, dict):
        raise ValueError(f"{config_file}: expected a JSON object, got {type(hf).__name__}")
    if weights is not None:
        check_config_sizes(hf, weights, str(config_file))
    check_config_bounds(hf, str(config_file))  # the raw JSON, before anything is allocated from it
    reader = ConfigReader(hf, config_file)
    family = family_of(reader)
    return family.read_config(reader), family, hf


def load_pretrained(path: str | Path, *, allow_pickle: bool = False, progress: bool = False) -> Pretrained:
    """Import an HF (Llama, Mistral, Qwen2, Qwen3, DeepSeek-V2/V3) or kvforge-typed directory."""
    path = Path(path)
    config, family, hf = load_config(path)
    tensors = read_weights(path, allow_pickle=allow_pickle, progress=progress)
    check_config_sizes(hf, tensors, str(path / "config.json"))  # the key named before any shape
    family.to_kvforge(tensors, config, hf)
    if config.tie_embeddings and EMBEDDINGS in tensors:
        tensors[LM_HEAD] = tensors[EMBEDDINGS]  # transformers ties (and ignores a stored lm_head) too
    check_tensors(config, tensors, str(path))
    return Pretrained(config, tensors, family.model_type, path, hf)


def save_pretrained(
    config: ModelConfig,
    state_dict: Mapping[str, torch.Tensor],
    out: str | Path,
    *,
    family: str | None = None,
    tokenizer_from: str | Path | None = None,
    overwrite: bool = False,
    dtype: torch.dtype | str | None = None,
    max_shard_size: int | str = "5GB",
    progress: bool = False,
) -> Path:
    """Export to ``out`` as ``family`` (None: the simplest stock class that holds the model, else a
    kvforge-typed directory; :func:`~kvforge.conversion.families.plan_export` says which and why).

    Tensors keep their dtype unless ``dtype`` is given (floating tensors only). ``state_dict`` may be a
    lazy mapping (a checkpoint read tensor by tensor, an FSDP2 model gathered layer by layer): the
    weights are written one decoder layer at a time (:func:`~kvforge.conversion.streamed_write.write_streamed`),
    so the whole model is never held, cast or copied at once. The directory is built next to ``out`` and
    renamed into place: an existing ``out`` is refused unless ``overwrite``, and a failure leaves nothing
    behind. What the user should know about the target (a kvforge-typed directory that stock servers
    will not load, zero biases added, ...) is logged as warnings."""
    plan = plan_export(config, family)
    chosen = plan.family
    meta = source_meta(state_dict)
    if config.tie_embeddings and EMBEDDINGS in meta:
        meta.setdefault(LM_HEAD, meta[EMBEDDINGS])
    check_tensors(config, meta, "save_pretrained(state_dict)")
    # transformers re-ties a tied head on load; safetensors refuses shared tensors
    skip = frozenset({LM_HEAD}) if config.tie_embeddings else frozenset()
    target = parse_dtype(dtype) if dtype is not None else None
    stored = next(
        (target or t.dtype for name, t in meta.items() if name not in skip and t.is_floating_point()), None
    )
    hf = export_config(chosen, config, stored)
    with atomic_directory(out, overwrite=overwrite) as tmp:
        write_streamed(
            state_dict,
            tmp,
            lambda tensors: chosen.to_hf(tensors, config, hf),
            dtype=target,
            skip=skip,
            max_shard_size=max_shard_size,
            progress=progress,
            meta=meta,
        )
        write_directory_files(tmp, chosen, hf, tokenizer_from)
    for note in plan.notes:
        log.warning("%s: %s", out, note)
    return Path(out)


def export_config(family: Family, config: ModelConfig, stored: torch.dtype | None) -> dict:
    """config.json of ``config`` exported as ``family``, with tensors stored in ``stored``."""
    hf = family.write_config(config)
    hf["dtype"] = hf["torch_dtype"] = str(stored or torch.float32).removeprefix("torch.")
    return hf


def write_directory_files(tmp: Path, family: Family, hf: dict, tokenizer_from: str | Path | None) -> None:
    """Everything of an exported directory but the weights: config.json, the family's extra files
    (kvforge-typed: its modeling code), tokenizer files and generation_config.json."""
    (tmp / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    for name, text in family.extra_files().items():
        (tmp / name).write_text(text)
    _copy_tokenizer(tokenizer_from, tmp, hf)


def _copy_tokenizer(source: str | Path | None, tmp: Path, hf: dict) -> None:
    """Tokenizer files and generation_config.json travel with the weights; without a source
    generation config, write the minimal one transformers derives from the model config."""
    if source is not None:
        for name in TOKENIZER_FILES:
            if (Path(source) / name).is_file():
                shutil.copy2(Path(source) / name, tmp / name)
    if not (tmp / "generation_config.json").exists():
        ids = {
            key: hf[key]
            for key in ("bos_token_id", "eos_token_id", "pad_token_id")
            if hf.get(key) is not None
        }
        (tmp / "generation_config.json").write_text(
            json.dumps({**ids, "_from_model_config": True}, indent=2) + "\n"
        )
