"""`kvforge eval` on training checkpoints: a Lightning .ckpt is read by the loader `kvforge export` uses."""

from __future__ import annotations

import json

import pytest
import torch

from kvforge.cli.main import main
from kvforge.evaluation import load_for_eval
from kvforge.training.export import export_checkpoint
from kvforge.training.module import KVForgeLM
from kvforge.training.optim import OptimizerConfig
from tests.conftest import shared_path
from tests.evaluation.helpers import TINYSTORIES
from tests.training.helpers import tiny_data, trainer


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """stories260K after 2 optimizer steps at a high learning rate, saved as a Lightning .ckpt."""
    root = tmp_path_factory.mktemp("checkpoint")
    corpus = root / "stories.txt"
    corpus.write_text(shared_path(*TINYSTORIES).read_text(encoding="utf-8")[:6_000], encoding="utf-8")
    module = KVForgeLM(
        init_from=str(shared_path("stories260K")),
        optim=OptimizerConfig(lr=1e-2, warmup_steps=0, total_steps=2, weight_decay=0.0),
    )
    run = trainer(root, 2)
    run.fit(module, datamodule=tiny_data(corpus, root / "cache", block_size=64, batch_size=2))
    run.save_checkpoint(root / "last.ckpt")
    return root / "last.ckpt", module.model


def test_eval_loads_the_checkpoints_trained_weights_and_its_runs_tokenizer(trained):
    checkpoint, model = trained
    loaded = load_for_eval(checkpoint, device="cpu")
    assert loaded.family == "checkpoint"
    assert loaded.tokenizer is not None and len(loaded.tokenizer) == 512
    ours = loaded.model.state_dict()
    assert ours.keys() == model.state_dict().keys()
    for name, tensor in model.state_dict().items():
        assert torch.equal(ours[name], tensor), name


def test_kvforge_eval_of_a_checkpoint_equals_eval_of_its_export(trained, tmp_path):
    checkpoint, _ = trained
    exported = export_checkpoint(checkpoint, tmp_path / "hf")
    quick = ["--tasks", "perplexity", "--max-tokens", "600", "--device", "cpu", "--no-plots"]
    text = ["--text", str(shared_path(*TINYSTORIES))]
    nll = {}
    for name, path in (("ckpt", checkpoint), ("export", exported), ("source", shared_path("stories260K"))):
        assert main(["eval", str(path), *text, *quick, "--out", str(tmp_path / name)]) == 0
        report = json.loads((tmp_path / name / "eval.json").read_text())
        nll[name] = report["models"][0]["perplexity"][0]["nll"]
    assert nll["ckpt"] == pytest.approx(nll["export"], abs=1e-6)
    assert abs(nll["ckpt"] - nll["source"]) > 1e-3  # the trained weights, not the starting point's
