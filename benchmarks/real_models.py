"""Real pretrained checkpoints for the benchmarks.

    python -m benchmarks.real_models fetch     download, check and import SmolLM2-135M-Instruct (idempotent)

The fetching itself lives in :mod:`benchmarks.real_model_fetch`; this is the command line.
"""

from __future__ import annotations

import argparse
import sys

from benchmarks.real_model_fetch import fetch, real_models_root


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.real_models", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser(
        "fetch",
        help=f"download and import SmolLM2-135M-Instruct into {real_models_root()} ($KVFORGE_REAL_MODELS)",
    )
    args = parser.parse_args(argv)
    if args.command == "fetch":
        print(f"ready: {fetch()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
