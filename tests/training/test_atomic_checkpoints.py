"""Checkpoint writes are all-or-nothing: a save that dies part-way leaves the previous checkpoint as it
was (single file through ``AtomicCheckpointIO``, sharded directory through ``FSDP2Strategy``), and the
next save sweeps the leftovers. The end-to-end SIGKILL test is test_crash_resume.py."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.strategies import model_parallel as lightning_model_parallel

from kvforge.training.checkpoint_io import AtomicCheckpointIO
from kvforge.training.fsdp import FSDP2Strategy


class Died(Exception):
    """Stands in for the process dying mid-write (the partial bytes are on disk, nothing cleans up)."""


def _checkpoint(step: int) -> dict:
    return {
        "state_dict": {"weight": torch.full((64,), float(step))},
        "optimizer_states": [],
        "global_step": step,
    }


def _files(directory) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def test_failed_save_keeps_the_previous_file_and_the_next_save_replaces_it(tmp_path, monkeypatch):
    io, path = AtomicCheckpointIO(), tmp_path / "last.ckpt"
    io.save_checkpoint(_checkpoint(1), path)
    before = path.read_bytes()

    def dies_half_way(obj, handle):
        handle.write(b"partial")
        raise Died

    monkeypatch.setattr(torch, "save", dies_half_way)
    with pytest.raises(Died):
        io.save_checkpoint(_checkpoint(2), path)
    monkeypatch.undo()
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]
    io.save_checkpoint(_checkpoint(3), path)
    assert io.load_checkpoint(path)["global_step"] == 3


def test_save_sweeps_temporaries_a_killed_save_left(tmp_path):
    path = tmp_path / "last.ckpt"
    (tmp_path / ".last.ckpt.tmp-killed").write_bytes(b"half a checkpoint")
    (tmp_path / ".other.ckpt.tmp-killed").write_bytes(b"another file's")
    with pytest.warns(UserWarning, match="Removed 1 partial checkpoint"):
        AtomicCheckpointIO().save_checkpoint(_checkpoint(1), path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.ckpt.tmp-killed", "last.ckpt"]


def test_checkpoint_file_gets_the_permissions_of_a_plain_write(tmp_path):
    path = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint(_checkpoint(1), path)
    (tmp_path / "plain").write_bytes(b"")
    assert path.stat().st_mode == (tmp_path / "plain").stat().st_mode


def _dies_mid_distributed_save(state, path):
    path.mkdir(parents=True, exist_ok=True)
    (path / "__0_0.distcp").write_bytes(b"partial shard")
    raise Died


@pytest.mark.parametrize(
    ("strategy", "keeps_previous"),
    [(FSDP2Strategy, True), (ModelParallelStrategy, False)],
    ids=["kvforge", "lightning"],
)
def test_sharded_checkpoint_survives_a_save_that_dies(tmp_path, monkeypatch, strategy, keeps_previous):
    """Lightning's own ModelParallelStrategy overwrites the shards in place and loses the checkpoint."""
    path = tmp_path / "last.ckpt"
    strategy().save_checkpoint(_checkpoint(1), path)
    before = _files(path)
    monkeypatch.setattr(lightning_model_parallel, "_distributed_checkpoint_save", _dies_mid_distributed_save)
    with pytest.raises(Died):
        strategy().save_checkpoint(_checkpoint(2), path)
    assert (_files(path) == before) is keeps_previous


def test_next_sharded_save_publishes_and_sweeps_the_partial_one(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    FSDP2Strategy().save_checkpoint(_checkpoint(1), path)
    with monkeypatch.context() as patch:
        patch.setattr(lightning_model_parallel, "_distributed_checkpoint_save", _dies_mid_distributed_save)
        with pytest.raises(Died):
            FSDP2Strategy().save_checkpoint(_checkpoint(2), path)
    FSDP2Strategy().save_checkpoint(_checkpoint(3), path)
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]
    assert torch.load(path / "meta.pt", weights_only=True)["global_step"] == 3
