"""Lightning checkpoints from elsewhere: ``--ckpt_path`` and ``kvforge export`` load them with
``torch.load(weights_only=True)``, so a checkpoint carrying code is refused (and the code never runs)
unless the user passes ``--weights_only false``; a truncated one is a clear error."""

from __future__ import annotations

import pathlib

import pytest
import torch

from kvforge.cli.main import main
from kvforge.training.lightning_cli import KVForgeCLI
from tests.training.helpers import cli_args, tiny_corpus, tiny_yaml


class RunsCode:
    """Unpickling this object creates ``marker`` (what an attacker's payload would do)."""

    def __init__(self, marker: pathlib.Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker,)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile-ckpt")
    config = tiny_yaml(root, tiny_corpus(root, chars=3_000), root / "cache", max_steps=1)
    KVForgeCLI(
        args=cli_args(
            "fit", config, root / "run", "--export.enabled", "false", "--model.optim.warmup_steps", "1"
        )
    )
    return config, root / "run" / "checkpoints" / "last.ckpt"


@pytest.fixture
def with_code(trained, tmp_path):
    checkpoint = torch.load(trained[1], weights_only=True)
    marker = tmp_path / "code-ran"
    checkpoint["payload"] = RunsCode(marker)
    path = tmp_path / "hostile.ckpt"
    torch.save(checkpoint, path)
    return path, marker


def _resume(config, run_dir, ckpt, *extra):
    return KVForgeCLI(
        args=cli_args("fit", config, run_dir, "--trainer.max_steps", "2", "--ckpt_path", str(ckpt), *extra)
    )


def test_resuming_from_a_checkpoint_carrying_code_is_refused(trained, with_code, tmp_path):
    ckpt, marker = with_code
    with pytest.raises(
        ValueError, match=r"hostile\.ckpt: the checkpoint holds objects .*--weights_only false"
    ):
        _resume(trained[0], tmp_path / "run", ckpt)
    assert not marker.exists()


def test_weights_only_false_is_the_explicit_opt_in(trained, with_code, tmp_path):
    ckpt, marker = with_code
    cli = _resume(trained[0], tmp_path / "run", ckpt, "--weights_only", "false")
    assert marker.exists() and cli.trainer.global_step == 2  # it really unpickled everything, then resumed


def test_export_of_a_checkpoint_carrying_code_is_refused(with_code, tmp_path, capsys):
    ckpt, marker = with_code
    assert main(["export", str(ckpt), str(tmp_path / "out")]) == 2
    assert "is not a readable PyTorch checkpoint" in capsys.readouterr().err
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_resuming_from_a_truncated_checkpoint_is_a_clear_error(trained, tmp_path):
    data = trained[1].read_bytes()
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"truncated\.ckpt: not a complete checkpoint"):
        _resume(trained[0], tmp_path / "run", truncated)


def test_train_py_reports_a_bad_source_in_one_line(tmp_path, capsys, monkeypatch):
    """``train.py`` (lightning_cli.main) answers a broken ``init_from`` as the kvforge commands do:
    one line naming the file, exit status 2, no traceback."""
    from kvforge.training.lightning_cli import main as train_main

    monkeypatch.delenv("KVFORGE_TRACEBACK", raising=False)
    source = tmp_path / "broken"
    source.mkdir()
    (source / "config.json").write_text("[1, 2, 3]")
    config = tiny_yaml(tmp_path, tiny_corpus(tmp_path, chars=3_000), tmp_path / "cache", max_steps=1)
    args = cli_args(
        "fit", config, tmp_path / "run", "--model.model", "null", "--model.init_from", str(source)
    )
    with pytest.raises(SystemExit) as exit_info:
        train_main(args)
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2
    assert err.startswith("train.py: error:") and "config.json" in err and "\n" not in err
    assert "Traceback" not in err
