"""Running ``train.py fit`` in subprocesses for the multi-process tests (Lightning re-launches the script
per rank, torchrun launches it per node), and reading what :class:`RankRecorder` wrote."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO


def records(directory: Path) -> list[dict]:
    """What each rank's ``RankRecorder`` wrote, in rank order."""
    return [
        json.loads((directory / f"rank{r}.json").read_text())
        for r in range(len(list(directory.glob("rank*.json"))))
    ]


def recorder_args(directory: Path) -> list[str]:
    return [
        "--trainer.callbacks+=tests.training.helpers.RankRecorder",
        "--trainer.callbacks.directory",
        str(directory),
    ]


def run_command(command: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def launch(config: Path, out: Path, devices: int, strategy: str, *extra: str) -> list[dict]:
    """``train.py fit`` on ``devices`` CPU processes writing to ``out``; the ranks' records."""
    command = [sys.executable, "train.py", "fit", "--config", str(config), "--trainer.devices", str(devices)]
    command += ["--trainer.strategy", strategy, "--trainer.default_root_dir", str(out)]
    run_command([*command, *recorder_args(out / "ranks"), *extra])
    return records(out / "ranks")
