"""Uptraining with a teacher on two CPU processes (gloo): the conversion runs once (global rank 0 writes
``<run>/converted``), FSDP2 shards the frozen teacher like the student, the losses equal a one-process
run on the same global batch, and a distributed checkpoint resumes on another world size (2 → 1 and
1 → 2 processes) with the losses of an uninterrupted run, data position included."""

from __future__ import annotations

import json

import pytest

from kvforge.training.setup_once import CONVERTED_DIR, RECIPE_FILE
from tests.training.launch import launch, one_process, recorder_args, records, uptrain_yaml

pytestmark = [pytest.mark.slow, pytest.mark.distributed]
STEPS, HALF = 4, 2
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    root = tmp_path_factory.mktemp("scale")
    return root, uptrain_yaml(root, STEPS, "  distill: {alpha: 0.5, temperature: 2.0, chunk_size: 48}\n")


@pytest.fixture(scope="module")
def uninterrupted(config):
    """One process with the global batch of two ranks (2 × 2 sequences), all the steps."""
    root, path = config
    return one_process(path, root / "single", STEPS)


def _checkpoint(out):
    return str(out / "checkpoints" / "last.ckpt")


def test_two_ranks_with_a_sharded_teacher_match_one_process_and_resume_on_one(config, uninterrupted):
    root, path = config
    first = launch(path, root / "two", 2, "fsdp2", "--trainer.max_steps", str(HALF))
    assert first[0]["mean"] == first[1]["mean"]
    assert first[0]["mean"] == pytest.approx(uninterrupted["mean"][:HALF], abs=TOLERANCE)
    teacher = first[0]["teacher"]
    assert not teacher["requires_grad"]
    assert teacher["local_numel"] <= teacher["numel"] // 2 + 1024  # sharded, not a replica
    recipe = json.loads((root / "two" / CONVERTED_DIR / RECIPE_FILE).read_text())
    assert recipe["recipe"]["convert"] == {"to": "gqa", "n_kv_heads": 2} and recipe["changed"]
    resumed = launch(
        path,
        root / "two-then-one",
        1,
        "fsdp2",
        "--data.batch_size",
        "4",
        "--trainer.max_steps",
        str(STEPS),
        "--ckpt_path",
        _checkpoint(root / "two"),
    )
    (record,) = resumed
    assert record["mean"] == pytest.approx(uninterrupted["mean"][HALF:], abs=TOLERANCE)
    assert record["checksum"] == pytest.approx(uninterrupted["checksum"], rel=TOLERANCE)


def test_one_rank_checkpoint_resumes_on_two(config, uninterrupted):
    root, path = config
    (first,) = launch(
        path, root / "one", 1, "fsdp2", "--data.batch_size", "4", "--trainer.max_steps", str(HALF)
    )
    assert first["mean"] == pytest.approx(uninterrupted["mean"][:HALF], abs=TOLERANCE)
    resumed = launch(
        path,
        root / "one-then-two",
        2,
        "fsdp2",
        "--trainer.max_steps",
        str(STEPS),
        "--ckpt_path",
        _checkpoint(root / "one"),
    )
    assert resumed[0]["mean"] == resumed[1]["mean"]
    assert resumed[0]["mean"] == pytest.approx(uninterrupted["mean"][HALF:], abs=TOLERANCE)
    assert resumed[0]["checksum"] == pytest.approx(uninterrupted["checksum"], rel=TOLERANCE)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _fit_command(path, out, *extra) -> list[str]:
    fit = ["train.py", "fit", "--config", str(path), "--trainer.num_nodes", "2", "--trainer.devices", "1"]
    fit += ["--trainer.strategy", "fsdp2", "--trainer.default_root_dir", str(out)]
    return [*fit, *recorder_args(out / "ranks"), *extra]


def _start_nodes(commands: list[tuple[list[str], dict[str, str]]], out) -> list[dict]:
    """Start one process per "node" (command, extra environment), wait for all, read their records."""
    import os
    import subprocess

    from tests.conftest import REPO

    nodes = [
        subprocess.Popen(
            command,
            cwd=REPO,
            env={**os.environ, "OMP_NUM_THREADS": "1", **env},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for command, env in commands
    ]
    outputs = [node.communicate(timeout=600)[0] for node in nodes]
    for node, output in zip(nodes, outputs):
        assert node.returncode == 0, output[-4000:]
    return records(out / "ranks")


def _two_nodes(path, out, *extra):
    """``torchrun --nnodes 2`` twice on this machine (one process per "node", c10d rendezvous over
    loopback, gloo), as a multi-host launch would start them."""
    import sys

    launcher = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1"]
    launcher += [
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
        f"127.0.0.1:{_free_port()}",
        "--rdzv-id",
        out.name,
    ]
    fit = _fit_command(path, out, *extra)
    return _start_nodes([([*launcher, "--node-rank", str(rank), *fit], {}) for rank in (0, 1)], out)


def _two_slurm_tasks(path, out, *extra):
    """What ``srun`` starts for ``#SBATCH --nodes=2 --ntasks-per-node=1``: the script itself once per
    task, with the SLURM_* variables Lightning's SLURMEnvironment reads (no torchrun, no Lightning
    launcher: the processes are created externally)."""
    import sys

    slurm = {
        "SLURM_JOB_NAME": "kvforge-test",  # not "bash"/"interactive", which Lightning treats as no SLURM
        "SLURM_JOB_ID": "4242",
        "SLURM_NTASKS": "2",
        "SLURM_NTASKS_PER_NODE": "1",
        "SLURM_NNODES": "2",
        "SLURM_NODELIST": "127.0.0.1",
        "SLURM_LOCALID": "0",
        "MASTER_PORT": str(_free_port()),
    }
    fit = [sys.executable, *_fit_command(path, out, *extra)]
    tasks = [{**slurm, "SLURM_PROCID": str(rank), "SLURM_NODEID": str(rank)} for rank in (0, 1)]
    return _start_nodes([(fit, env) for env in tasks], out)


def test_two_nodes_by_torchrun_agree_and_resume(config, uninterrupted):
    root, path = config
    first = _two_nodes(path, root / "nodes", "--trainer.max_steps", str(HALF))
    assert [r["world"] for r in first] == [2, 2]
    assert first[0]["mean"] == first[1]["mean"]
    assert first[0]["mean"] == pytest.approx(uninterrupted["mean"][:HALF], abs=TOLERANCE)
    resumed = _two_nodes(path, root / "nodes", "--trainer.max_steps", str(STEPS), "--ckpt_path", "last")
    assert resumed[0]["mean"] == resumed[1]["mean"]
    assert resumed[0]["mean"] == pytest.approx(uninterrupted["mean"][HALF:], abs=TOLERANCE)
    assert resumed[0]["checksum"] == pytest.approx(uninterrupted["checksum"], rel=TOLERANCE)


def test_two_nodes_as_srun_starts_them_agree_and_resume(config, uninterrupted):
    """The SLURM launch of docs/training.md, with the environment srun gives each task."""
    root, path = config
    first = _two_slurm_tasks(path, root / "slurm", "--trainer.max_steps", str(HALF))
    assert [r["world"] for r in first] == [2, 2]
    assert first[0]["mean"] == first[1]["mean"]
    assert first[0]["mean"] == pytest.approx(uninterrupted["mean"][:HALF], abs=TOLERANCE)
    resumed = _two_slurm_tasks(path, root / "slurm", "--trainer.max_steps", str(STEPS), "--ckpt_path", "last")
    assert resumed[0]["mean"] == resumed[1]["mean"]
    assert resumed[0]["mean"] == pytest.approx(uninterrupted["mean"][HALF:], abs=TOLERANCE)
