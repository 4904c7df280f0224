"""DDP and FSDP2 on two CPU processes (gloo): both ranks agree, the loss equals a one-process run on
the same global batch, and the FSDP2 (distributed) checkpoint resumes and exports.

Each run is ``python train.py fit ...`` in a subprocess: Lightning re-launches that script per rank."""

from __future__ import annotations

import pytest
import torch

from kvforge.conversion import load_pretrained
from kvforge.training.export import export_checkpoint
from tests.training.helpers import expected_host_allocator
from tests.training.launch import launch, one_process, uptrain_yaml

pytestmark = [pytest.mark.slow, pytest.mark.distributed]
STEPS = 4


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    root = tmp_path_factory.mktemp("distributed")
    return root, uptrain_yaml(root, STEPS)


@pytest.fixture(scope="module")
def single(config):
    """One process with the global batch of two ranks (2 × 2 sequences), all the steps."""
    root, path = config
    return one_process(path, root / "single", STEPS)


def _launch(config, name, strategy, *extra):
    root, path = config
    out = root / name
    return out, launch(path, out, 2, strategy, *extra)


def test_ddp_ranks_agree_and_match_one_process_on_the_global_batch(config, single):
    _, (rank0, rank1) = _launch(config, "ddp", "ddp", "--trainer.max_steps", str(STEPS))
    assert rank0["mean"] == rank1["mean"]
    assert rank0["checksum"] == rank1["checksum"]
    assert rank0["local"] != rank1["local"]  # each rank trained on its own shard
    assert rank0["host_allocator"] == rank1["host_allocator"] == expected_host_allocator()
    assert rank0["mean"] == pytest.approx(single["mean"], abs=1e-5)
    assert rank0["checksum"] == pytest.approx(single["checksum"], rel=1e-5)


def test_fsdp2_matches_one_process_and_its_checkpoint_resumes_and_exports(config, single):
    half = STEPS // 2
    out, first = _launch(config, "fsdp2", "fsdp2", "--trainer.max_steps", str(half))
    assert first[0]["mean"] == first[1]["mean"]
    assert first[0]["mean"] == pytest.approx(single["mean"][:half], abs=1e-5)
    assert [rank["host_allocator"] for rank in first] == [expected_host_allocator()] * 2
    checkpoint = out / "checkpoints" / "last.ckpt"
    assert checkpoint.is_dir()  # a distributed (sharded) checkpoint
    _, resumed = _launch(config, "fsdp2", "fsdp2", "--trainer.max_steps", str(STEPS), "--ckpt_path", "last")
    assert resumed[0]["mean"] == resumed[1]["mean"]
    assert resumed[0]["mean"] == pytest.approx(single["mean"][half:], abs=1e-5)
    assert resumed[0]["checksum"] == pytest.approx(single["checksum"], rel=1e-5)
    exported = load_pretrained(export_checkpoint(out / "checkpoints" / "last.ckpt", out / "from-ckpt"))
    at_fit_end = load_pretrained(out / "hf")
    for name, tensor in at_fit_end.state_dict.items():
        torch.testing.assert_close(exported.state_dict[name], tensor, rtol=0, atol=0)
