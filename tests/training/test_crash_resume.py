"""A training process SIGKILLed mid-save or mid-epoch loses no work: ``--ckpt_path last`` finds the
previous good checkpoint and the resumed run ends with the weights and loss of an uninterrupted one.

Real ``train.py fit`` subprocesses on CPU (one thread, fixed seed, deterministic kernels), killed by
``tests/training/faults.py`` at a chosen step. Tolerance: bitwise equality. The resumed process
replays exactly the operations the uninterrupted one ran (same weights, AdamW moments, schedule,
RNG and data position from the checkpoint; same single-threaded CPU kernels), so any difference at
all is a resume bug, not rounding.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO
from tests.training.helpers import cli_args, tiny_corpus, tiny_yaml

pytestmark = pytest.mark.slow

STEPS, EVERY = 12, 4


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    root = tmp_path_factory.mktemp("crash")
    return tiny_yaml(root, tiny_corpus(root, chars=6_000), root / "cache", max_steps=STEPS)


def _fit(config, run_dir, fault: str = "", resume: bool = False) -> int:
    args = cli_args(
        "fit",
        config,
        run_dir,
        "--checkpoint.every_n_train_steps",
        str(EVERY),
        "--export.enabled",
        "false",
        "--trainer.callbacks+=tests.training.faults.FaultInjector",
        *(["--ckpt_path", "last"] if resume else []),
    )
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "KVFORGE_TEST_FAULT": fault,
        "KVFORGE_TEST_LOSSES": str(run_dir.parent / f"{run_dir.name}-losses.jsonl"),
    }
    done = subprocess.run(
        [sys.executable, "train.py", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    if done.returncode not in (0, -signal.SIGKILL):
        raise AssertionError(f"train.py failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return done.returncode


def _losses(run_dir) -> dict[int, dict]:
    lines = (run_dir.parent / f"{run_dir.name}-losses.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    return {record["step"]: record for record in records}  # a replayed step keeps its last record


def _checkpoint(run_dir, name: str = "last.ckpt") -> dict:
    return torch.load(run_dir / "checkpoints" / name, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def uninterrupted(config, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("uninterrupted") / "run"
    assert _fit(config, run_dir) == 0
    return _checkpoint(run_dir), _losses(run_dir)


def _assert_same_end(run_dir, uninterrupted) -> None:
    expected, expected_losses = uninterrupted
    final = _checkpoint(run_dir)
    assert final["global_step"] == expected["global_step"] == STEPS
    assert final["state_dict"].keys() == expected["state_dict"].keys()
    for name, tensor in expected["state_dict"].items():
        assert torch.equal(final["state_dict"][name], tensor), name
    losses = _losses(run_dir)
    assert [losses[s]["loss"] for s in range(1, STEPS + 1)] == [
        expected_losses[s]["loss"] for s in range(1, STEPS + 1)
    ]


def test_kill_while_writing_last_ckpt_keeps_the_previous_one_and_resume_matches(
    config, uninterrupted, tmp_path
):
    run_dir = tmp_path / "run"
    assert _fit(config, run_dir, fault=f"save:{2 * EVERY}") == -signal.SIGKILL
    partial = list((run_dir / "checkpoints").glob(".last.ckpt.tmp-*"))
    assert len(partial) == 1 and partial[0].stat().st_size > 0, "the kill did not happen mid-write"
    assert _checkpoint(run_dir)["global_step"] == EVERY  # the previous good last.ckpt, intact
    assert _fit(config, run_dir, resume=True) == 0
    assert not list((run_dir / "checkpoints").glob(".last.ckpt.tmp-*"))  # the partial write was swept
    _assert_same_end(run_dir, uninterrupted)


def test_kill_mid_epoch_resumes_from_last_ckpt_and_matches(config, uninterrupted, tmp_path):
    run_dir, killed_at = tmp_path / "run", 2 * EVERY + 2
    assert _fit(config, run_dir, fault=f"step:{killed_at}") == -signal.SIGKILL
    losses = _losses(run_dir)
    assert max(losses) == killed_at and losses[killed_at]["epoch"] == uninterrupted[1][killed_at + 1]["epoch"]
    assert _checkpoint(run_dir)["global_step"] == 2 * EVERY
    assert _fit(config, run_dir, resume=True) == 0
    _assert_same_end(run_dir, uninterrupted)
