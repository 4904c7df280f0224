"""Issue 31's fuzzer, longer: random hostile inputs for every command, a table of what happened.

The same cases and invariant as ``tests/conversion/test_fuzz_inputs.py`` (``tests/conversion/hostile_inputs.py``:
one damage to a tiny valid checkpoint per case; ``tests/conversion/capped_runner.py``: every command run
in-process in a worker whose address space is capped), drawn from a seeded generator instead of
hypothesis, many more of them, and counted rather than stopped at the first failure:

    PYTHONPATH=. python -m benchmarks.fuzz_inputs --examples 2000 [--seed 0] [--commands inspect,convert]

Columns per command: cases tried, accepted (exit 0: the damage was harmless to it), clean refusals (a
non-zero exit with one clear line naming the file or field, or inspect's report and verdict), failures
(a traceback, an allocation beyond the cap, a crash or hang, a partial output, an input that must be
refused accepted, an error naming neither file nor field). Each distinct failure is then listed once
with a case that shows it. Exit status 1 when anything failed.
"""

from __future__ import annotations

import argparse
import random
import tempfile
from collections import Counter
from pathlib import Path

from rich.console import Console
from rich.table import Table

from tests.conversion.capped_runner import CappedRunner
from tests.conversion.hostile_inputs import COMMANDS, try_case, write_base_gguf, write_base_model


class RandomDraw:
    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def choice(self, options):
        return self.rng.choice(list(options))

    def integer(self, low, high):
        return self.rng.randint(low, high)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--examples", type=int, default=400, help="cases in all, spread over the commands")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--commands", default=",".join(COMMANDS), help="comma-separated subset")
    args = parser.parse_args()
    commands = [name for name in args.commands.split(",") if name]
    unknown = sorted(set(commands) - set(COMMANDS))
    if unknown:
        parser.error(f"--commands: unknown {unknown}; allowed: {list(COMMANDS)}")
    rng, console = random.Random(args.seed), Console(highlight=False)
    counts = {command: Counter() for command in commands}
    failures: dict[tuple[str, str], str] = {}
    runner = CappedRunner()
    with tempfile.TemporaryDirectory(prefix="kvforge-fuzz-") as tmp:
        root = Path(tmp)
        bases = write_base_model(root / "model"), write_base_gguf(root / "model.gguf")
        for index in range(args.examples):
            command = commands[index % len(commands)]
            expected, outcome, problems = try_case(
                command, bases, runner, root / f"case-{index}", RandomDraw(rng)
            )
            verdict = "failures" if problems else "accepted" if outcome.rc == 0 else "clean refusals"
            counts[command].update(["tried", verdict])
            for problem in problems:
                failures.setdefault((command, problem.split(":")[0][:80]), f"{expected.what}: {problem}")
    runner.close()
    table = Table(title=f"kvforge commands on {args.examples} hostile inputs (seed {args.seed})")
    for column in ("command", "tried", "accepted", "clean refusals", "failures"):
        table.add_column(column, justify="left" if column == "command" else "right")
    total = Counter()
    for command, count in counts.items():
        total.update(count)
        table.add_row(
            command, *(str(count[key]) for key in ("tried", "accepted", "clean refusals", "failures"))
        )
    table.add_row("all", *(str(total[key]) for key in ("tried", "accepted", "clean refusals", "failures")))
    console.print(table)
    for (command, _), example in sorted(failures.items()):
        console.print(f"[bold red]{command}[/]: {example[:400]}")
    return int(bool(total["failures"]))


if __name__ == "__main__":
    raise SystemExit(main())
