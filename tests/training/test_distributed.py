"""DDP and FSDP2 on two CPU processes (gloo): both ranks agree, the loss equals a one-process run on
the same global batch, and the FSDP2 (distributed) checkpoint resumes and exports.

Each run is ``python train.py fit ...`` in a subprocess: Lightning re-launches that script per rank."""

from __future__ import annotations

import pytest
import torch

from kvforge.conversion import load_pretrained
from kvforge.training.export import export_checkpoint
from kvforge.training.lightning_cli import KVForgeCLI
from tests.conftest import shared_path
from tests.training.launch import launch, recorder_args, records

pytestmark = [pytest.mark.slow, pytest.mark.distributed]
STEPS = 4


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    root = tmp_path_factory.mktemp("distributed")
    text = shared_path("corpora", "tinystories_val_prefix.txt").read_text(encoding="utf-8")[:40_000]
    (root / "stories.txt").write_text(text, encoding="utf-8")
    path = root / "uptrain.yaml"
    path.write_text(
        f"""model:
  init_from: {shared_path("stories260K-mha")}
  convert: {{to: gqa, n_kv_heads: 2}}
  optim: {{lr: 0.002, warmup_steps: 1, total_steps: {STEPS}}}
data:
  train_files: [{root / "stories.txt"}]
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
    return root, path


@pytest.fixture(scope="module")
def single(config):
    """One process with the global batch of two ranks (2 × 2 sequences)."""
    root, path = config
    out = root / "single"
    args = ["fit", "--config", str(path), "--data.batch_size", "4", "--trainer.max_steps", str(STEPS)]
    KVForgeCLI(args=[*args, "--trainer.default_root_dir", str(out), *recorder_args(out / "ranks")])
    (record,) = records(out / "ranks")
    return record


def _launch(config, name, strategy, *extra):
    root, path = config
    out = root / name
    return out, launch(path, out, 2, strategy, *extra)


def test_ddp_ranks_agree_and_match_one_process_on_the_global_batch(config, single):
    _, (rank0, rank1) = _launch(config, "ddp", "ddp", "--trainer.max_steps", str(STEPS))
    assert rank0["mean"] == rank1["mean"]
    assert rank0["checksum"] == rank1["checksum"]
    assert rank0["local"] != rank1["local"]  # each rank trained on its own shard
    assert rank0["mean"] == pytest.approx(single["mean"], abs=1e-5)
    assert rank0["checksum"] == pytest.approx(single["checksum"], rel=1e-5)


def test_fsdp2_matches_one_process_and_its_checkpoint_resumes_and_exports(config, single):
    half = STEPS // 2
    out, first = _launch(config, "fsdp2", "fsdp2", "--trainer.max_steps", str(half))
    assert first[0]["mean"] == first[1]["mean"]
    assert first[0]["mean"] == pytest.approx(single["mean"][:half], abs=1e-5)
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
