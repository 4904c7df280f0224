"""The ``kvforge`` console script: one entry point, one subcommand per job.

Each subcommand is one module of this package, ``kvforge.cli.<name>``, exposing ``add_arguments(parser)``
and ``run(args)``. Only the module of the command being run is imported, so ``kvforge --help`` stays
instant however heavy a command's imports are. Training itself is ``python train.py fit ...``
(LightningCLI).
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "forms": (
        "kvforge.cli.forms",
        "build a small model of every attention form and print its KV bytes",
    ),
    "quickstart": (
        "kvforge.cli.quickstart",
        "uptrain stories260K-mha into GQA-2 with distillation on CPU, evaluate, export, generate",
    ),
    "export": (
        "kvforge.cli.export",
        "write a model directory or a training checkpoint as a stock Hugging Face class (or kvforge-typed)",
    ),
    "convert": (
        "kvforge.cli.convert",
        "change a model's attention into a KV-efficient form (GQA, MQA, MLA, CLA, windows) and export it",
    ),
    "import": (
        "kvforge.cli.import_gguf",
        "import a llama.cpp GGUF file as a Hugging Face model directory",
    ),
    "inspect": (
        "kvforge.cli.inspect",
        "per-layer attention forms, parameters and KV-cache bytes of a model directory",
    ),
    "generate": (
        "kvforge.cli.generate",
        "generate text from a model directory (static KV cache, CUDA-graph decode on GPU)",
    ),
    "eval": (
        "kvforge.cli.eval",
        "perplexity, context curve, passkey retrieval, KV bytes, peak memory and decode speed of models",
    ),
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The parser of every command, or with ``only`` the full parser of that one command alone (the
    others are listed with their one-line help, their modules not imported)."""
    parser = argparse.ArgumentParser(
        prog="kvforge", description="Train, uptrain and convert language models with a small KV cache."
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        if only is not None and name != only:
            subparsers.add_parser(name, help=help_text)
            continue
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
    argv = sys.argv[1:] if argv is None else argv
    command = next((word for word in argv if not word.startswith("-")), None)
    args = build_parser(only=command if command in COMMANDS else "").parse_args(argv)
    try:
        return args._module.run(args) or 0
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        # one line, whatever the message quotes (torch's unpickling errors span several)
        print(f"kvforge {args.command}: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
