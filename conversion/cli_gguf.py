"""`kvforge export SRC OUT --format gguf`: the command-line side of :func:`kvforge.conversion.gguf.export_gguf`."""

from __future__ import annotations

import argparse


def export_gguf_command(args: argparse.Namespace, config, weights, console) -> int:
    from kvforge.conversion.gguf import export_gguf

    family = None if args.family == "auto" else args.family
    out, said = export_gguf(
        config,
        weights,
        args.out,
        outtype=args.outtype,
        tokenizer_from=args.src,
        family=family,
        overwrite=args.overwrite,
    )
    console.print(f"Wrote {out} ({out.stat().st_size:,} bytes): " + "; ".join(said))
    console.print("Runs in llama.cpp / llama-cpp-python / Ollama (this file format is what they load).")
    return 0
