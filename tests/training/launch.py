"""Running ``train.py fit`` in subprocesses for the multi-process tests (Lightning re-launches the script
per rank, torchrun launches it per node), and reading what :class:`RankRecorder` wrote."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO, shared_path


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


def uptrain_yaml(root: Path, steps: int, model_extra: str = "") -> Path:
    """A train.py config uptraining stories260K-mha to GQA-2 on 40k characters of TinyStories, 2 × 64
    tokens per rank; ``model_extra``: more lines under ``model:``."""
    text = shared_path("corpora", "tinystories_val_prefix.txt").read_text(encoding="utf-8")[:40_000]
    (root / "stories.txt").write_text(text, encoding="utf-8")
    path = root / "uptrain.yaml"
    path.write_text(
        f"""model:
  init_from: {shared_path("stories260K-mha")}
  convert: {{to: gqa, n_kv_heads: 2}}
  optim: {{lr: 0.002, warmup_steps: 1, total_steps: {steps}}}
{model_extra}data:
  sources: [{{files: [{root / "stories.txt"}]}}]
  block_size: 64
  batch_size: 2
  val_fraction: 0.0
  cache_dir: {root / "cache"}
trainer:
  accelerator: cpu
  logger: false
  limit_val_batches: 0
  enable_progress_bar: false
  enable_model_summary: false
"""
    )
    return path


def one_process(config: Path, out: Path, steps: int) -> dict:
    """In this process, the global batch of two ranks (2 × 2 sequences): the reference record."""
    from kvforge.training.lightning_cli import KVForgeCLI

    args = ["fit", "--config", str(config), "--data.batch_size", "4", "--trainer.max_steps", str(steps)]
    KVForgeCLI(args=[*args, "--trainer.default_root_dir", str(out), *recorder_args(out / "ranks")])
    (record,) = records(out / "ranks")
    return record
