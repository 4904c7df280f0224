"""Import a llama.cpp GGUF file as a Hugging Face directory, one dequantised tensor at a time.

    import_gguf("SmolLM2-135M-Instruct.Q4_1.gguf", "smollm2")   # -> an HF Llama directory (fp32)

transformers reads GGUF (``from_pretrained(..., gguf_file=...)``) but refuses to save what it loaded
("quantized with gguf and is not serializable") and holds the whole model to get there. Here its reader
is used piece by piece instead: the config it parses from the metadata, its tokenizer conversion, its
GGUF→HF tensor-name map and its per-architecture tensor processors (for llama-architecture files the
Q/K rows llama.cpp permuted into rotary pairs are put back in rotate-half order; Gemma's norms lose the
+1 llama.cpp added), with gguf's own dequantisation - applied to one tensor when kvforge's streamed
writer asks for it. Host memory is about one decoder layer of dequantised tensors; the file is mapped.

The output is an ordinary export (config.json without ``quantization_config``, safetensors, tokenizer
files, generation_config.json) plus ``kvforge_provenance.json``: the source file, its sha256 and its
quantisation types. Anything the reader cannot map is refused rather than dropped.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from collections import Counter
from collections.abc import Iterator, Mapping
from functools import cache
from pathlib import Path

import gguf
import numpy as np
import torch
import transformers
from gguf import GGMLQuantizationType, GGUFReader
from huggingface_hub.errors import StrictDataclassError

from ..config_bounds import check_config_bounds
from ..families import Family, family_of
from ..families.schema import ConfigReader
from ..pretrained import save_pretrained
from .deepseek2 import ARCH as DEEPSEEK2
from .deepseek2 import deepseek2_config, deepseek2_names, join_kv_b
from .granite_swa import ARCH as GRANITE_SWA
from .granite_swa import granite_swa_config, sink_layers, with_windows_and_sinks
from .header_check import check_gguf_header

PROVENANCE_FILE = "kvforge_provenance.json"
# GGUF architecture -> what kvforge imports it as (transformers' reader covers these and kvforge has the family).
ARCHITECTURES = {
    "llama": "Llama (and Mistral, which llama.cpp writes as 'llama')",
    "qwen2": "Qwen2",
    "qwen3": "Qwen3",
    "gemma2": "Gemma 2",
    "gemma3": "Gemma 3 (text model)",
    "deepseek2": "DeepSeek-V2/V3 MLA, dense MLP (read by kvforge: transformers' GGUF reader has no deepseek2)",
    "granite_swa": "Llama recipe with sliding windows and sinks, as kvforge writes it (read by kvforge)",
}
# Tensors llama.cpp adds that transformers' reader does not map, and why importing without them is wrong.
UNMAPPED_MEANING = {"rope_freqs.weight": "Llama-3 RoPE frequency factors (rope_scaling)"}


def import_gguf(
    path: str | Path,
    out: str | Path,
    *,
    dtype: torch.dtype | str | None = None,
    overwrite: bool = False,
    progress: bool = False,
) -> Path:
    """Write the model in the GGUF ``path`` as a Hugging Face directory ``out`` (atomically). ``dtype``:
    the stored float type (default: float32 when any tensor is quantised or float32, else the file's
    half type - dequantised values are exact in it)."""
    out = Path(out)
    if out.exists() and not overwrite:  # before the file is read
        raise FileExistsError(f"{out} already exists; pass overwrite=True (CLI: --overwrite) to replace it")
    source = GGUFSource(path)
    out.resolve().parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.gguf-import-", dir=out.resolve().parent) as extras:
        try:  # transformers' tokenizer conversion and the tensors may disagree with the metadata: name the file
            source.save_tokenizer(Path(extras))
            (Path(extras) / PROVENANCE_FILE).write_text(json.dumps(source.provenance(), indent=2) + "\n")
            return save_pretrained(
                source.config,
                source.weights(),
                out,
                family=source.export_family,
                tokenizer_from=extras,
                overwrite=overwrite,
                dtype=dtype or source.natural_dtype,
                progress=progress,
            )
        except ValueError as err:
            raise ValueError(f"{source.path}: {err}") from err


def read_provenance(directory: str | Path) -> dict | None:
    """The ``kvforge_provenance.json`` of a model directory (None without one)."""
    file = Path(directory) / PROVENANCE_FILE
    return json.loads(file.read_text()) if file.is_file() else None


def sha256_of(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


@cache
def dequantizable(qtype: GGMLQuantizationType) -> bool:
    """Whether gguf (the package transformers' reader dequantises with) can dequantise this type."""
    block_bytes = gguf.GGML_QUANT_SIZES[qtype][1]
    try:
        gguf.quants.dequantize(np.zeros((1, block_bytes), dtype=np.uint8), qtype)
    except (NotImplementedError, ValueError, TypeError):
        return False
    return True


def supported_types() -> list[str]:
    return [qtype.name for qtype in GGMLQuantizationType if dequantizable(qtype)]


class GGUFSource:
    """A GGUF file opened for import: checked (architecture, tensor types, names) before anything is written."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: no such GGUF file")
        check_gguf_header(self.path)  # the reader trusts its counts (an array of 3e9 elements: hours)
        try:
            self.reader = GGUFReader(self.path)
        except (ValueError, IndexError, OSError) as err:
            raise ValueError(f"{self.path}: not a readable GGUF file ({err})") from None
        self.architecture = _field(self.reader, "general.architecture")
        if self.architecture not in ARCHITECTURES:
            raise ValueError(_unsupported_architecture(self.path, self.architecture))
        self._check_types()
        self._check_block_count()
        if self.architecture == DEEPSEEK2:
            self.hf_config = deepseek2_config(self.reader, _field)
        elif self.architecture == GRANITE_SWA:
            self.hf_config = granite_swa_config(self.reader, _field)
        else:
            biased = any(t.name.endswith(".attn_q.bias") for t in self.reader.tensors)
            head_dim = _field(self.reader, f"{self.architecture}.attention.key_length", None)
            self.hf_config = _transformers_config(self.path, attention_bias=biased, head_dim=head_dim)
        hf = self.hf_config.to_dict()
        hf.pop("quantization_config", None)
        reader = ConfigReader(hf, f"{self.path} (config read by transformers)")
        self.family: Family = family_of(reader)
        self.config = self.family.read_config(reader)
        self.export_family: str | None = self.family.model_type
        if self.architecture == GRANITE_SWA:  # windows/sinks: the export picks the family that holds them
            self.config, self.export_family = with_windows_and_sinks(self.config, self.reader, _field), None
        self.hf = hf
        self.tensors = self._map_tensors()

    def _check_types(self) -> None:
        bad = sorted({t.tensor_type.name for t in self.reader.tensors if not dequantizable(t.tensor_type)})
        if bad:
            names = [t.name for t in self.reader.tensors if t.tensor_type.name in bad]
            raise ValueError(
                f"{self.path}: tensor type(s) {bad} cannot be dequantised (tensors {names[:4]}, "
                f"{len(names)} in all). Supported types: {supported_types()}"
            )

    def _check_block_count(self) -> None:
        """The layer count the metadata declares is the one the tensors (``blk.N.*``) hold, checked before
        transformers builds a model of that many layers."""
        key = f"{self.architecture}.block_count"
        declared = _field(self.reader, key, None)
        indices = [t.name.split(".")[1] for t in self.reader.tensors if t.name.startswith("blk.")]
        held = 1 + max((int(i) for i in indices if i.isdigit()), default=-1)
        if declared != held:
            raise ValueError(f"{self.path}: {key}={declared} but the tensors hold {held} layers (blk.N)")

    def _map_tensors(self) -> dict[str, object]:
        """kvforge name -> the reader's tensor, through transformers' GGUF→HF name map."""
        from transformers import AutoModelForCausalLM
        from transformers.modeling_gguf_pytorch_utils import (
            TENSOR_PROCESSORS,
            TensorProcessor,
            get_gguf_hf_weights_map,
        )

        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(self.hf_config)
        tensors_as = "llama" if self.architecture == GRANITE_SWA else self.architecture  # Llama's layout
        self.processor = TENSOR_PROCESSORS.get(tensors_as, TensorProcessor)(config=self.hf)
        if self.architecture == DEEPSEEK2:
            hf_names = deepseek2_names(model, self.config.n_layers)
        else:
            hf_names = get_gguf_hf_weights_map(model, self.processor)
        if self.architecture == GRANITE_SWA:
            sinks = sink_layers(self.reader)
            hf_names.update({name: f"model.layers.{layer}.self_attn.sinks" for name, layer in sinks.items()})
            no_sinks = {t.name for t in self.reader.tensors if t.name.endswith(".attn_sinks.weight")} - set(
                sinks
            )
        else:
            no_sinks = set()  # "no sink" logits (-1e30 on every head) are how granite_swa says: none
        read = [t for t in self.reader.tensors if t.name not in no_sinks]
        unmapped = [t.name for t in read if t.name not in hf_names]
        if unmapped:
            meaning = "; ".join(f"{n}: {UNMAPPED_MEANING[n]}" for n in unmapped if n in UNMAPPED_MEANING)
            raise ValueError(
                f"{self.path}: transformers' GGUF reader maps no parameter to tensors {unmapped[:6]} "
                f"({len(unmapped)} in all{'; ' + meaning if meaning else ''}); importing without them "
                "would compute a different model"
            )
        tensors: dict[str, list] = {}
        for tensor in read:  # kv_b_proj gathers its two halves, k_b first
            tensors.setdefault(self.family.kvforge_name(hf_names[tensor.name]), []).append(tensor)
        return tensors

    @property
    def natural_dtype(self) -> torch.dtype:
        kinds = {t.tensor_type for t in self.reader.tensors}
        halves = {GGMLQuantizationType.BF16: torch.bfloat16, GGMLQuantizationType.F16: torch.float16}
        if kinds <= {GGMLQuantizationType.F32, *halves}:
            found = [dtype for kind, dtype in halves.items() if kind in kinds]
            return found[0] if found else torch.float32
        return torch.float32

    def weights(self) -> GGUFWeights:
        return GGUFWeights(self)

    def save_tokenizer(self, directory: Path) -> None:
        gguf_tokenizer(self.path).save_pretrained(directory)

    def provenance(self) -> dict:
        types = Counter(t.tensor_type.name for t in self.reader.tensors)
        file_type = _field(self.reader, "general.file_type", None)
        return {
            "imported_from": "gguf",
            "source_file": self.path.name,
            "sha256": sha256_of(self.path),
            "bytes": self.path.stat().st_size,
            "gguf_architecture": self.architecture,
            "gguf_name": _field(self.reader, "general.name", None),
            "file_type": _file_type_name(file_type),
            "tensor_types": dict(sorted(types.items())),
            "tokenizer_pre": _field(self.reader, "tokenizer.ggml.pre", None),
            "readers": {"transformers": transformers.__version__, "gguf": _gguf_version()},
        }


class GGUFWeights(Mapping):
    """A read-only state dict (kvforge names and layout) whose tensors are dequantised when read."""

    def __init__(self, source: GGUFSource) -> None:
        self.source = source

    def meta(self) -> dict[str, torch.Tensor]:
        return {
            name: torch.empty(self._shape(parts), device="meta")
            for name, parts in self.source.tensors.items()
        }

    @staticmethod
    def _shape(parts: list) -> tuple[int, ...]:
        shapes = [tuple(reversed([int(d) for d in t.shape])) for t in parts]
        if len(shapes) == 1:
            return shapes[0]
        (heads, rank, nope), (_, v_dim, _) = shapes  # attn_k_b, attn_v_b -> kv_b_proj
        return (heads * (nope + v_dim), rank)

    def __getitem__(self, name: str) -> torch.Tensor:
        parts = [self._values(tensor) for tensor in self.source.tensors[name]]
        values = parts[0] if len(parts) == 1 else join_kv_b(*parts)
        hf_name = self.source.family.hf_name(name)
        tensors = {hf_name: torch.from_numpy(np.array(values, dtype=np.float32))}
        self.source.family.to_kvforge(tensors, self.source.config, self.source.hf)
        return tensors[name]

    def _values(self, tensor) -> np.ndarray:
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        shape = tuple(reversed([int(d) for d in tensor.shape]))
        return self.source.processor.process(weights=values.reshape(shape), name=tensor.name).weights

    def __iter__(self) -> Iterator[str]:
        return iter(self.source.tensors)

    def __len__(self) -> int:
        return len(self.source.tensors)


def gguf_tokenizer(path: Path):
    """The tokenizer a GGUF embeds, built by transformers' GGUF tokenizer conversion.

    ``AutoTokenizer.from_pretrained(..., gguf_file=...)`` does the same but fails on files whose special
    ids lie outside the vocabulary (llama.cpp writes an absent pad token as 2**32 - 1): such ids are
    dropped here. On files without that problem the result is token-for-token the AutoTokenizer one."""
    from transformers import PreTrainedTokenizerFast
    from transformers.integrations.gguf import GGUF_TOKENIZER_MAPPING, convert_gguf_tokenizer
    from transformers.integrations.gguf.reader import read_gguf_metadata

    metadata, _ = read_gguf_metadata(str(path), ("tokenizer.ggml.tokens", "tokenizer.ggml.merges"))
    if "tokenizer.ggml.tokens" not in metadata:
        raise ValueError(f"{path}: the GGUF embeds no tokenizer (no tokenizer.ggml.tokens)")
    grouped = {
        group: {
            name: metadata[f"tokenizer.{key}"] for key, name in keys.items() if f"tokenizer.{key}" in metadata
        }
        for group, keys in GGUF_TOKENIZER_MAPPING.items()
    }
    vocab, settings = grouped["tokenizer"], grouped["tokenizer_config"]
    if vocab.get("tokenizer_type") == "llama":
        settings.setdefault("add_bos_token", True)  # as transformers: llama.cpp adds BOS to sentencepiece
    for token, (metadata_key, vocab_key) in _SPECIAL_TOKENS.items():
        index = metadata.get(f"tokenizer.ggml.{metadata_key}")
        if index is not None and 0 <= index < len(vocab["tokens"]):
            settings[token] = vocab["tokens"][index]
        else:
            vocab.pop(vocab_key, None)
    backend, extra = convert_gguf_tokenizer(metadata["general.architecture"], vocab)
    return PreTrainedTokenizerFast(tokenizer_object=backend, **settings, **extra)


_SPECIAL_TOKENS = {
    "bos_token": ("bos_token_id", "bos_token_id"),
    "eos_token": ("eos_token_id", "eos_token_id"),
    "unk_token": ("unknown_token_id", "unk_token_id"),
    "pad_token": ("padding_token_id", "pad_token_id"),
}


def _transformers_config(path: Path, attention_bias: bool, head_dim: int | None):
    """The transformers config ``from_pretrained(gguf_file=...)`` builds, with four repairs: special ids
    outside the vocabulary (2**32 - 1 = none) become None, float32 metadata (rms_norm_eps stored as
    9.99999974e-06) is given back its shortest decimal form (1e-05), and a Llama whose file holds
    attention biases says so (``attention_bias``; the reader never sets it, so it would drop them), and
    ``head_dim`` comes from ``attention.key_length`` where the reader has no key for it (Qwen3, Gemma:
    it would fall back to the class default, right only for the published sizes)."""
    from transformers import AutoConfig
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    parsed = load_gguf_checkpoint(str(path), return_tensors=False)["config"]
    vocab = parsed.get("vocab_size")
    for key in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
        if isinstance(parsed.get(key), int) and vocab is not None and not 0 <= parsed[key] < vocab:
            parsed[key] = None
    for key, value in parsed.items():
        if isinstance(value, float) and float(np.float32(value)) == value:
            parsed[key] = float(str(np.float32(value)))
    if head_dim is not None:
        parsed.setdefault("head_dim", int(head_dim))
    if attention_bias and parsed.get("model_type") in ("llama", "mistral"):
        parsed["attention_bias"] = True
    where = f"{path} (config from its metadata)"
    check_config_bounds(parsed, where)  # before transformers builds anything from the sizes
    try:
        return AutoConfig.for_model(**parsed)
    except (ValueError, TypeError, StrictDataclassError) as err:
        raise ValueError(f"{where}: refused by transformers: {' '.join(str(err).split())}") from None


def _field(reader: GGUFReader, key: str, default: object = ...) -> object:
    field = reader.get_field(key)
    if field is None:
        if default is ...:
            raise ValueError(f"{reader.data.filename}: GGUF metadata has no {key!r}")
        return default
    return field.contents()


def _file_type_name(file_type: object) -> str | None:
    """``general.file_type`` by llama.cpp's name for it (MOSTLY_Q4_1, ...); a number it does not know stays one."""
    if file_type is None:
        return None
    try:
        return gguf.LlamaFileType(int(file_type)).name
    except ValueError:
        return str(file_type)


def _unsupported_architecture(path: Path, architecture: object) -> str:
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    supported = ", ".join(f"{name!r} ({what})" for name, what in ARCHITECTURES.items())
    why = (
        "kvforge has no family for it"
        if architecture in GGUF_SUPPORTED_ARCHITECTURES
        else "transformers' GGUF reader cannot read it"
    )
    return f"{path}: GGUF architecture {architecture!r} is not supported ({why}). Supported: {supported}"


def _gguf_version() -> str:
    from importlib.metadata import version

    return version("gguf")
