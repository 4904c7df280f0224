"""Import a llama.cpp GGUF file as a Hugging Face model directory.

    kvforge import model.gguf OUT [--dtype fp32|bf16|fp16] [--overwrite]

Architectures: llama (Llama, Mistral, SmolLM, ...), qwen2, qwen3, gemma2, gemma3. Every tensor type the
`gguf` package dequantises is read (F32, F16, BF16, Q4_0 ... Q8_0, the K- and IQ-quants). The weights
are dequantised through transformers' GGUF reader one tensor at a time and written as safetensors
(default dtype: float32 for quantised files, the file's own for F16/BF16 ones); OUT also gets
config.json, the tokenizer the GGUF embeds (with its chat template), generation_config.json and
kvforge_provenance.json (source file, sha256, quantisation types). `kvforge convert` and `kvforge eval`
take a .gguf file directly: they import it once into a cache ($KVFORGE_CACHE/gguf, default
~/.cache/kvforge/gguf) and read the cached directory from then on.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from kvforge.conversion.gguf import import_gguf, read_provenance

from .export import add_output_arguments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("gguf", metavar="GGUF", help="llama.cpp GGUF file to import")
    parser.add_argument("out", metavar="OUT", help="directory to write; must not exist unless --overwrite")
    add_output_arguments(
        parser,
        dtype_help="stored dtype (default: fp32 for quantised files - dequantised values are exact in it; "
        "else the file's own float type)",
    )


def run(args: argparse.Namespace) -> int:
    if Path(args.out).exists() and not args.overwrite:
        raise FileExistsError(f"{args.out} already exists; pass --overwrite to replace it")
    out = import_gguf(args.gguf, args.out, dtype=args.dtype, overwrite=args.overwrite, progress=True)
    provenance = read_provenance(out)
    types = ", ".join(f"{name} x{count}" for name, count in provenance["tensor_types"].items())
    print(f"Wrote {out} from {provenance['source_file']} (sha256 {provenance['sha256'][:16]}…; {types})")
    return 0
