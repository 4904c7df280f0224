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


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["quality"]:  # its own parser, flags and --help
        return real_model_quality.main(argv[1:], source=real_model_dir())
    if argv[:1] == ["uptrain"]:
        return real_uptrain.main(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m benchmarks.real_models", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser(
        "fetch",
        help=f"download and import SmolLM2-135M-Instruct into {real_models_root()} ($KVFORGE_REAL_MODELS)",
    )
    commands.add_parser("quality", help="zero-shot conversion quality table (see its --help)")
    commands.add_parser("uptrain", help="uptraining recovery table against the control (see its --help)")
    args = parser.parse_args(argv)
    if args.command == "fetch":
        print(f"ready: {fetch()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
