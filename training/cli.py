"""The ``kvforge`` console script: one entry point, one subcommand per job.

Each subcommand lives in its own module exposing ``add_arguments(parser)`` and ``run(args)``; heavy
imports happen inside ``run`` so that ``kvforge --help`` stays instant. Training itself is
``python train.py fit ...`` (LightningCLI).
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "forms": (
        "kvforge.training.forms_demo",
        "build a small model of every attention form and print its KV bytes",
    ),
    "quickstart": (
        "kvforge.training.quickstart",
        "uptrain stories260K-mha into GQA-2 with distillation on CPU, evaluate, export, generate",
    ),
    "export": (
        "kvforge.training.export",
        "write a model directory or a training checkpoint as a stock Hugging Face class (or kvforge-typed)",
    ),
    "convert": (
        "kvforge.conversion.cli_convert",
        "change a model's attention into a KV-efficient form (GQA, MQA, MLA, CLA, windows) and export it",
    ),
    "import": (
        "kvforge.conversion.cli_import",
        "import a llama.cpp GGUF file as a Hugging Face model directory",
    ),
    "inspect": (
        "kvforge.conversion.cli_inspect",
        "per-layer attention forms, parameters and KV-cache bytes of a model directory",
    ),
    "generate": (
        "kvforge.training.generate",
        "generate text from a model directory (static KV cache, CUDA-graph decode on GPU)",
    ),
    "eval": (
        "kvforge.training.evaluation.command",
        "perplexity, context curve, passkey retrieval, KV bytes, peak memory and decode speed of models",
    ),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvforge", description="Train, uptrain and convert language models with a small KV cache."
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(module_name)
        sub = subparsers.add_parser(
            name,
            help=help_text,
            description=module.__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_arguments(sub)
        sub.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args._module.run(args) or 0
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        print(f"kvforge {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
