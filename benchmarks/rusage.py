"""Run one command and record its own peak RSS and CPU time, unaffected by the caller's memory.

    python -m benchmarks.rusage RESULT.json -- COMMAND [ARGS...]

On Linux a child's ``ru_maxrss`` starts from its parent's resident set at fork (``exec`` keeps the
larger of the old and the new high-water marks), so a benchmark that holds a model and launches a
conversion directly would count its own memory in the conversion's peak. This launcher is a bare
interpreter (~10 MB) between the two: it runs COMMAND, waits for it with ``wait4`` and writes
``{"returncode", "cpu_s", "peak_rss_gib"}`` to RESULT.json; its exit status is COMMAND's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys


def wait_measured(process: subprocess.Popen) -> tuple[int, float, float]:
    """Wait for ``process``; its ``(returncode, CPU seconds (user + system), peak RSS GiB)``, from
    ``wait4``. The peak is its own only where the caller's resident set at fork was small (above)."""
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    return process.returncode, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 2**20  # KiB on Linux


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[1] != "--":
        print(__doc__, file=sys.stderr)
        return 2
    result, command = argv[0], argv[2:]
    code, cpu, peak = wait_measured(subprocess.Popen(command))
    record = {"returncode": code, "cpu_s": cpu, "peak_rss_gib": peak}
    with open(result, "w") as handle:
        json.dump(record, handle)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
