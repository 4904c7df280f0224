"""Real pretrained checkpoints for the benchmarks.

    python -m benchmarks.real_models fetch     download, check and import SmolLM2-135M-Instruct (idempotent)
    python -m benchmarks.real_models quality   zero-shot quality of every form with CLI defaults
                                               (benchmarks.real_model_quality; --help for its flags)
    python -m benchmarks.real_models uptrain   distil converted models back toward the source vs a control
                                               (benchmarks.real_uptrain; --help for its flags)

The fetching itself lives in :mod:`benchmarks.real_model_fetch`; this is the command line.
"""

from __future__ import annotations

import argparse
import sys

from benchmarks import real_model_quality, real_uptrain
from benchmarks.real_model_fetch import fetch, real_model_dir, real_models_root

# Subcommands with a parser, flags and --help of their own: (what it prints, how to run the rest of argv)
DELEGATED = {
    "quality": (
        "zero-shot conversion quality table (see its --help)",
        lambda rest: real_model_quality.main(rest, source=real_model_dir()),
    ),
    "uptrain": ("uptraining recovery table against the control (see its --help)", real_uptrain.main),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] and argv[0] in DELEGATED:
        return DELEGATED[argv[0]][1](argv[1:])
    parser = argparse.ArgumentParser(prog="python -m benchmarks.real_models", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser(
        "fetch",
        help=f"download and import SmolLM2-135M-Instruct into {real_models_root()} ($KVFORGE_REAL_MODELS)",
    )
    for name, (help_text, _) in DELEGATED.items():
        commands.add_parser(name, help=help_text)
    args = parser.parse_args(argv)
    if args.command == "fetch":
        print(f"ready: {fetch()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
