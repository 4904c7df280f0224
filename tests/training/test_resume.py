"""Resume is exact: k steps, then k more from the checkpoint, give the losses of 2k uninterrupted steps
(same weights, optimizer, schedule and data position), across epoch boundaries."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from tests.training.helpers import LossRecorder, tiny_corpus, tiny_data, tiny_module, trainer

TOTAL = 16  # 5 batches per pass over the data: the run crosses three epoch boundaries


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    corpus = tiny_corpus(root, chars=1_300)
    return root, corpus


def _run(root, corpus, max_steps, ckpt_path=None, callbacks=()):
    torch.manual_seed(123)  # a fresh (different) init: the checkpoint must overwrite all of it
    recorder = LossRecorder()
    data = tiny_data(corpus, root / "cache")
    run = trainer(
        root / "run", max_steps, callbacks=[recorder, *callbacks], limit_val_batches=2, val_check_interval=3
    )
    run.fit(tiny_module(steps=TOTAL), datamodule=data, ckpt_path=ckpt_path)
    return recorder.losses, data


@pytest.fixture(scope="module")
def uninterrupted(setup):
    root, corpus = setup
    losses, data = _run(root, corpus, TOTAL)
    assert len(data.train_dataloader()) == 5, "the corpus size no longer gives 5 batches per epoch"
    return losses


@pytest.mark.parametrize("stop", [3, 5, 7])
def test_resume_after_max_steps_matches_uninterrupted_run(setup, uninterrupted, stop, tmp_path):
    root, corpus = setup
    checkpoints = ModelCheckpoint(dirpath=tmp_path, save_last=True, every_n_train_steps=1000)
    first, _ = _run(root, corpus, stop, callbacks=[checkpoints])
    resumed, _ = _run(root, corpus, TOTAL, ckpt_path=str(tmp_path / "last.ckpt"))
    assert sorted(first) == list(range(1, stop + 1))
    assert sorted(resumed) == list(range(stop + 1, TOTAL + 1))
    for step in range(1, TOTAL + 1):
        got = first[step] if step <= stop else resumed[step]
        assert got == pytest.approx(uninterrupted[step], abs=1e-5), f"step {step}"


def test_resume_from_a_mid_run_checkpoint_matches_uninterrupted_run(setup, uninterrupted, tmp_path):
    root, corpus = setup
    every_4 = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=4, save_top_k=-1, filename="{step}")
    _run(root, corpus, 9, callbacks=[every_4])
    resumed, _ = _run(root, corpus, TOTAL, ckpt_path=str(tmp_path / "step=8.ckpt"))
    assert sorted(resumed) == list(range(9, TOTAL + 1))
    for step in resumed:
        assert resumed[step] == pytest.approx(uninterrupted[step], abs=1e-5), f"step {step}"
