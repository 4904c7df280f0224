"""Export a model as one GGUF file that llama.cpp (and Ollama on top of it) runs, written with the
`gguf` package's writer one decoder layer at a time.

    export_gguf(config, state_dict, "model.gguf", outtype="q8_0", tokenizer_from="model_dir")

The model goes first to the stock Hugging Face family ``plan_export`` picks (names and layout of that
family's tables), then through the llama.cpp architecture that runs the family
(:mod:`.architectures`): its metadata, its tensor layout, gguf's tensor names. A form llama.cpp has
no architecture for is refused with the form and the layers - never written as a file that loads and
computes something else. The tokenizer and chat template go into the metadata (:mod:`.vocab`).

``outtype``: f32 | f16 | bf16 | q8_0 for the matrices; vectors (norms, biases) stay f32 as llama.cpp's
converter keeps them; a q8_0 matrix whose rows are not a whole number of 32-value blocks is f16.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as Q

from kvforge.arch import ModelConfig

from ..atomic import atomic_file
from ..families import FAMILIES, StockFamily, plan_export
from ..pretrained import LM_HEAD, export_config
from ..streamed_write import read_many, source_meta, tensor_groups
from .architectures import BY_FAMILY, GRANITE_SWA, GGUFArchitecture
from .vocab import add_tokenizer

SWA_FAMILIES = ("llama", "mistral", "qwen2")  # Llama-recipe families whose windows go to granite_swa
OUTTYPES = {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0}
FILE_TYPES = {
    "f32": gguf.LlamaFileType.ALL_F32,
    "f16": gguf.LlamaFileType.MOSTLY_F16,
    "bf16": gguf.LlamaFileType.MOSTLY_BF16,
    "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
}


def gguf_plan(config: ModelConfig, family: str | None = None) -> tuple[StockFamily, GGUFArchitecture]:
    """The HF family and llama.cpp architecture a model exports through; a clear error when none can."""
    problems = form_problems(config)
    if problems:
        raise ValueError("llama.cpp cannot run this model: " + "; ".join(problems))
    # Sinks hold no stock HF family but granite_swa runs them: plan the names and layout without them.
    without_sinks = [dataclasses.replace(spec, sinks=False) for spec in config.layers]
    plan = plan_export(dataclasses.replace(config, layers=without_sinks, pattern=None), family)
    if not plan.family.stock or plan.family.model_type not in BY_FAMILY:
        reasons = plan.notes[0] if plan.notes else f"{plan.family.model_type} has no llama.cpp architecture"
        raise ValueError(f"llama.cpp has no architecture for this model ({reasons})")
    chosen, arch = plan.family, BY_FAMILY[plan.family.model_type]
    windowed = any(spec.window is not None or spec.sinks for spec in config.layers)
    if windowed and plan.family.model_type in SWA_FAMILIES:
        chosen, arch = FAMILIES["llama"], GRANITE_SWA  # Llama's names and layout, granite_swa's graph
    problem = arch.why_not(config) or _rope_problem(config, arch)
    if problem:
        raise ValueError(
            f"cannot export as llama.cpp {arch.name!r} (from {plan.family.model_type}): {problem}"
        )
    return chosen, arch


def form_problems(config: ModelConfig) -> list[str]:
    """Forms llama.cpp has no architecture for, with the layers that have them."""
    checks = {
        "cross-layer K/V sharing (kv_from)": lambda spec: spec.kv_from is not None,
        "grouped-tied attention (gta)": lambda spec: spec.attention == "gta",
        "grouped-latent attention (gla)": lambda spec: spec.attention == "gla",
        "chunked attention": lambda spec: spec.chunk is not None,
        "NoPE layers (rope off)": lambda spec: not spec.rope,
    }
    problems = []
    for form, has in checks.items():
        layers = [index for index, spec in enumerate(config.layers) if has(spec)]
        if layers:
            problems.append(f"{form} on layers {layers}")
    kinds = {spec.attention for spec in config.layers}
    if {"mla", "gqa"} <= kinds:
        mla = [index for index, spec in enumerate(config.layers) if spec.attention == "mla"]
        problems.append(f"MLA on layers {mla} mixed with GQA on the others (one architecture per file)")
    kv_heads = {spec.n_kv_heads or config.n_kv_heads for spec in config.layers if spec.attention == "gqa"}
    if len(kv_heads) > 1:
        problems.append(f"different K/V head counts per layer {sorted(kv_heads)}")
    return problems


def _rope_problem(config: ModelConfig, arch: GGUFArchitecture) -> str | None:
    scaling = config.rope_scaling
    if scaling is not None and scaling.type not in arch.rope_scaling:
        allowed = ", ".join(arch.rope_scaling) or "none"
        return (
            f"rope_scaling {scaling.type!r} is not written for llama.cpp's {arch.name} (written: {allowed})"
        )
    return None


def export_gguf(
    config: ModelConfig,
    state_dict: Mapping[str, torch.Tensor],
    out: str | Path,
    *,
    outtype: str = "f32",
    tokenizer_from: str | Path | None = None,
    family: str | None = None,
    name: str | None = None,
    overwrite: bool = False,
) -> tuple[Path, list[str]]:
    """Write ``out`` (atomically); returns it and what was written, one line each."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; pass overwrite=True (CLI: --overwrite) to replace it")
    if outtype not in OUTTYPES:
        raise ValueError(f"outtype={outtype!r}: allowed values are {sorted(OUTTYPES)}")
    chosen, arch = gguf_plan(config, family)
    # config.json of the family, for its tensor layouts (Llama's naming for granite_swa has none)
    hf = export_config(chosen, config, torch.float32) if chosen.why_not(config) is None else {}
    skip = {LM_HEAD} if config.tie_embeddings else set()
    meta = {n: t for n, t in source_meta(state_dict).items() if n not in skip}
    groups = tensor_groups(meta)
    names = gguf.get_tensor_name_map(_model_arch(arch.names_from or arch.name), config.n_layers)
    with atomic_file(out) as tmp:
        writer = gguf.GGUFWriter(str(tmp), arch.name)
        said = _write_metadata(writer, config, arch, outtype, name or out.stem, tokenizer_from)
        planned = []
        for group in groups:
            for gguf_name, tensor in _gguf_tensors(
                {n: meta[n] for n in group}, config, chosen, arch, hf, names
            ):
                planned.append(gguf_name)
                _add_info(writer, gguf_name, tensor, outtype)
        extra = arch.extra_tensors(config)
        for gguf_name, tensor in extra:
            planned.append(gguf_name)
            _add_info(writer, gguf_name, tensor, outtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        order = iter(planned)
        for group in groups:
            tensors = read_many(state_dict, group)
            for gguf_name, tensor in _gguf_tensors(tensors, config, chosen, arch, hf, names):
                _write(writer, order, gguf_name, tensor, outtype)
            del tensors
        for gguf_name, tensor in extra:
            _write(writer, order, gguf_name, tensor, outtype)
        writer.close()
    said.insert(
        0, f"llama.cpp architecture {arch.name!r} (via {chosen.model_type}), {len(planned)} tensors {outtype}"
    )
    return out, said


def _model_arch(name: str) -> gguf.MODEL_ARCH:
    return next(key for key, value in gguf.MODEL_ARCH_NAMES.items() if value == name)


def _gguf_tensors(tensors, config, family, arch, hf, names) -> Iterator[tuple[str, torch.Tensor]]:
    """One group of kvforge tensors -> (GGUF name, tensor) in llama.cpp's layout."""
    tensors = dict(tensors)
    family.to_hf(tensors, config, hf)
    for hf_name, tensor in tensors.items():
        for name, converted in arch.tensors(config, hf_name, tensor):
            if name.startswith("blk."):  # already llama.cpp's name (tensors gguf has no HF name for)
                yield name, converted
                continue
            base, _, suffix = name.rpartition(".")
            gguf_name = names.get_name(base)
            if gguf_name is None:
                raise ValueError(f"{name}: gguf has no {arch.name} tensor name for it")
            yield f"{gguf_name}.{suffix}", converted


def _kind(tensor: torch.Tensor, outtype: str) -> Q:
    if tensor.dim() < 2:
        return Q.F32
    kind = OUTTYPES[outtype]
    if kind == Q.Q8_0 and tensor.shape[-1] % gguf.GGML_QUANT_SIZES[Q.Q8_0][0]:
        return Q.F16
    return kind


def _add_info(writer: gguf.GGUFWriter, name: str, tensor: torch.Tensor, outtype: str) -> None:
    kind, shape = _kind(tensor, outtype), tuple(tensor.shape)
    if kind in (Q.F32, Q.F16):
        dtype = np.float32 if kind == Q.F32 else np.float16
        writer.add_tensor_info(name, shape, np.dtype(dtype), int(np.prod(shape)) * np.dtype(dtype).itemsize)
    else:
        byte_shape = gguf.quant_shape_to_byte_shape(shape, kind)
        writer.add_tensor_info(name, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)), raw_dtype=kind)


def _write(
    writer: gguf.GGUFWriter, order: Iterator[str], name: str, tensor: torch.Tensor, outtype: str
) -> None:
    expected = next(order)
    if name != expected:
        raise ValueError(f"GGUF tensors came in another order than planned: {name} where {expected} was")
    values = tensor.detach().to("cpu", torch.float32).contiguous().numpy()
    if not np.isfinite(values).all():
        raise ValueError(f"{name}: non-finite values; a GGUF of them would compute NaN")
    kind = _kind(tensor, outtype)
    if kind == Q.F32:
        writer.write_tensor_data(values)
    elif kind == Q.F16:
        writer.write_tensor_data(values.astype(np.float16))
    else:
        writer.write_tensor_data(gguf.quants.quantize(values, kind))


def _write_metadata(
    writer, config: ModelConfig, arch: GGUFArchitecture, outtype, name, tokenizer_from
) -> list[str]:
    writer.add_name(name)
    writer.add_file_type(FILE_TYPES[outtype])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for key, value in arch.hparams(config).items():
        _add_value(writer, f"{arch.name}.{key}", value)
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):  # named before gguf's "bos: -1"
        value = getattr(config, key)
        if any(i is not None and i < 0 for i in (value if isinstance(value, list) else [value])):
            raise ValueError(
                f"{tokenizer_from or 'the model'}: {key}={value!r}: a GGUF stores token ids >= 0"
            )
    return [add_tokenizer(writer, Path(tokenizer_from) if tokenizer_from else None, config.vocab_size)]


def _add_value(writer: gguf.GGUFWriter, key: str, value: Any) -> None:
    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int):
        writer.add_uint32(key, value)
    elif isinstance(value, float):
        writer.add_float32(key, value)
    elif isinstance(value, str):
        writer.add_string(key, value)
    elif isinstance(value, list):
        writer.add_array(key, value)
    else:
        raise TypeError(f"GGUF metadata {key}={value!r}: unsupported type {type(value).__name__}")


__all__ = ["OUTTYPES", "export_gguf", "form_problems", "gguf_plan"]
