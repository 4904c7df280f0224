"""Run kvforge commands in-process in a worker process whose address space is capped, and judge what they
did against issue 31's invariant (``outcome_problems``).

The worker (``python -m tests.conversion.capped_runner``) imports every command once, then caps its own
address space with ``RLIMIT_AS`` at what it uses plus ``MEMORY_CAP``: an allocation beyond that raises
``MemoryError`` inside the command (reported as a failure) instead of taking the machine's memory.
Commands run in-process through ``kvforge.cli.main.main(argv)``, one per request read from stdin, with
their stdout and stderr captured; a crash, a hang past ``timeout`` or growth of the worker's own memory
restarts it. Why a worker rather than the test process itself: the cap then never applies to pytest,
and a hostile file that crashes a native reader kills the worker, not the test run. ``RLIMIT_AS`` is
Linux's (other systems do not enforce it: the runner refuses to start there).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import resource
import select
import subprocess
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path

MEMORY_CAP = 2 * 2**30  # address space one command may add: the tiny inputs need a few tens of MB
REPO = Path(__file__).resolve().parents[2]
TRAIN = "train"  # the pseudo-command for train.py's model source (model.init_from)
ERROR_LINE = re.compile(r"^kvforge [\w-]+: ")


def vm_size() -> int:
    with open("/proc/self/status") as status:
        return int(next(line for line in status if line.startswith("VmSize")).split()[1]) * 1024


def _train_source(directory: str) -> int:
    """What train.py does with ``model.init_from`` before building anything (its errors, one line)."""
    from kvforge.training.model_source import resolve_starting_point

    try:
        resolve_starting_point(None, directory, None, None, None, want_teacher=False)
    except (ValueError, FileNotFoundError) as err:
        print(f"kvforge {TRAIN}: error: {err}", file=sys.stderr)
        return 2
    return 0


def run_in_process(argv: list[str]) -> dict:
    """One command, its output captured; an exception that escapes it is reported, never raised."""
    from kvforge.cli.main import main

    out, err = io.StringIO(), io.StringIO()
    escaped = None
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = _train_source(argv[1]) if argv[0] == TRAIN else main(argv)
        except SystemExit as stop:  # argparse
            rc = stop.code if isinstance(stop.code, int) else int(stop.code is not None)
        except BaseException:
            rc, escaped = None, traceback.format_exc()
    return {
        "rc": rc,
        "stdout": out.getvalue()[-6000:],
        "stderr": err.getvalue()[-6000:],
        "escaped": escaped,
        "vm": vm_size(),
    }


def serve() -> None:
    """The worker: import everything, cap the address space, answer one JSON request per line."""
    protocol = os.fdopen(os.dup(1), "w")
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)  # native writes to fd 1 must not corrupt the protocol
    # imported before the cap: transformers' GGUF reader, train's model source
    import kvforge.conversion.gguf.reading
    import kvforge.training.model_source  # noqa: F401
    from kvforge.cli.main import build_parser

    build_parser()  # imports every command's module
    start = vm_size()
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (start + MEMORY_CAP, hard))
    protocol.write(json.dumps({"ready": start}) + "\n")
    protocol.flush()
    for line in sys.stdin:
        protocol.write(json.dumps(run_in_process(json.loads(line)["argv"])) + "\n")
        protocol.flush()


@dataclass
class Outcome:
    argv: list[str]
    rc: int | None = None
    stdout: str = ""
    stderr: str = ""
    escaped: str | None = None  # the traceback of an exception main() let through
    died: str | None = None  # the worker crashed or hung on this command

    @property
    def error_line(self) -> str:
        lines = [line for line in self.stderr.splitlines() if line.strip()]
        return lines[-1] if lines else ""


class CappedRunner:
    """A worker process that runs commands in-process under the address-space cap (see the module doc)."""

    def __init__(self, timeout: float = 120.0) -> None:
        if not sys.platform.startswith("linux"):
            raise RuntimeError("the capped runner needs Linux (RLIMIT_AS is not enforced elsewhere)")
        self.timeout, self.process, self.start_vm = timeout, None, 0

    def _start(self) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
        env.setdefault("HF_HUB_OFFLINE", "1")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.conversion.capped_runner"],
            cwd=REPO,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        ready = self._read(600)
        if ready is None:
            raise RuntimeError("the capped worker did not start")
        self.start_vm = ready["ready"]

    def _read(self, timeout: float) -> dict | None:
        readable, _, _ = select.select([self.process.stdout], [], [], timeout)
        line = self.process.stdout.readline() if readable else ""
        return json.loads(line) if line else None

    def run(self, argv: list[str]) -> Outcome:
        if self.process is None:
            self._start()
        self.process.stdin.write(json.dumps({"argv": argv}) + "\n")
        self.process.stdin.flush()
        answer = self._read(self.timeout)
        if answer is None:
            alive = self.process.poll() is None
            self.close()
            how = f"hung for more than {self.timeout:.0f} s" if alive else "the worker process died (crash)"
            return Outcome(argv, died=how)
        if answer["vm"] > self.start_vm + MEMORY_CAP // 2:  # what one command left behind eats the cap
            self.close()
        return Outcome(argv, answer["rc"], answer["stdout"], answer["stderr"], answer["escaped"])

    def close(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None


@dataclass
class Expectation:
    """What a damaged input allows: ``must_fail`` (no command may accept it) and the words an error about
    it must contain one of (the damaged file's name, the config key, the tensor)."""

    what: str
    must_fail: bool = False
    names: tuple[str, ...] = field(default_factory=tuple)


def outcome_problems(outcome: Outcome, expected: Expectation) -> list[str]:
    """Issue 31's invariant: a non-zero exit with one clear line naming the file or field, no traceback, no
    allocation beyond the cap; success only where the input allows it. ``[]`` when it holds."""
    if outcome.died:
        return [outcome.died]
    if outcome.escaped:
        last = outcome.escaped.strip().splitlines()[-1]
        return [f"{'allocation beyond the cap: ' if 'MemoryError' in last else ''}exception escaped: {last}"]
    problems = []
    text = outcome.stdout + outcome.stderr
    if "Traceback (most recent call last)" in text:
        problems.append("a traceback was printed")
    if "MemoryError" in text:
        problems.append("MemoryError (allocation beyond the cap)")
    if outcome.rc == 0:
        if expected.must_fail:
            problems.append("exit 0 on an input that must be refused")
        return problems
    inspect_verdict = outcome.argv[0] == "inspect" and outcome.rc == 1
    if inspect_verdict:  # the report on stdout, then its verdict
        if not re.search(r"weights [A-Z]+:", outcome.stdout):
            problems.append("inspect exited 1 without a verdict on the weights")
        return problems
    line = outcome.error_line
    if not ERROR_LINE.match(line):
        problems.append(f"the last line of stderr is not a kvforge error: {line[:200]!r}")
    elif expected.names and not any(name in line for name in expected.names):
        problems.append(f"the error names none of {list(expected.names)}: {line[:300]!r}")
    return problems


if __name__ == "__main__":
    serve()
