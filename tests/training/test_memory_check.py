"""A run that cannot fit stops before the model is built, with the estimate, the free memory and a
suggestion; one that fits trains; ``--memory_check false`` overrides; precision and FSDP2 count."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from lightning.pytorch.strategies import ModelParallelStrategy, SingleDeviceStrategy

from kvforge.arch.memory import estimate_training_memory
from kvforge.training import memory_check
from kvforge.training.lightning_cli import KVForgeCLI
from kvforge.training.memory_check import DoesNotFitError, MemoryCheck, estimate_run
from tests.training.helpers import cli_args, tiny_config, tiny_corpus, tiny_module, tiny_yaml

MiB = 1024**2


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    root = tmp_path_factory.mktemp("memory")
    return tiny_yaml(root, tiny_corpus(root, chars=4_000), root / "cache", max_steps=2)


def _fit(config, run_dir, *overrides):
    return KVForgeCLI(args=cli_args("fit", config, run_dir, "--export.enabled", "false", *overrides))


def test_a_huge_batch_fails_before_training_with_the_numbers_and_a_suggestion(config, tmp_path):
    with pytest.raises(DoesNotFitError) as error:
        _fit(config, tmp_path / "run", "--data.batch_size", "200000000")  # ~36 TB of activations
    message = str(error.value)
    for part in ("GiB per device", "activations", "optimizer state", "GiB free", "lower the micro-batch"):
        assert part in message
    assert "--memory_check false" in message
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_fake_small_free_memory_fails_before_the_model_is_built(config, tmp_path, monkeypatch):
    monkeypatch.setattr(memory_check, "available_memory", lambda device: MiB)
    with pytest.raises(DoesNotFitError, match=r"but cpu has 0\.001 GiB free"):
        _fit(config, tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_run_that_fits_trains(config, tmp_path, monkeypatch):
    monkeypatch.setattr(memory_check, "available_memory", lambda device: 1024 * MiB)
    assert _fit(config, tmp_path / "run").trainer.global_step == 2


def test_memory_check_false_skips_the_check(config, tmp_path, monkeypatch):
    monkeypatch.setattr(memory_check, "available_memory", lambda device: MiB)
    cli = _fit(config, tmp_path / "run", "--memory_check", "false")
    assert cli.trainer.global_step == 2
    assert not any(isinstance(c, MemoryCheck) for c in cli.trainer.callbacks)


def _trainer(precision: str, strategy, world_size: int = 1):
    data = SimpleNamespace(batch_size=4, block_size=32)
    return SimpleNamespace(precision=precision, strategy=strategy, world_size=world_size, datamodule=data)


def test_estimate_uses_the_precisions_activation_dtype():
    module = tiny_module()
    full = estimate_run(_trainer("32-true", SingleDeviceStrategy("cpu")), module)
    mixed = estimate_run(_trainer("bf16-mixed", SingleDeviceStrategy("cpu")), module)
    expected = estimate_training_memory(tiny_config(), 4, 32, param_dtype="fp32", activation_dtype="bf16")
    assert mixed == expected and mixed.parameters == full.parameters
    assert mixed.activations < full.activations


def test_estimate_divides_weights_and_optimizer_state_over_fsdp2_ranks():
    module = tiny_module()
    single = estimate_run(_trainer("32-true", SingleDeviceStrategy("cpu")), module)
    sharded = estimate_run(_trainer("32-true", ModelParallelStrategy(), world_size=4), module)
    assert sharded.optimizer == single.optimizer // 4 and sharded.parameters == single.parameters // 4
    assert sharded.activations == single.activations


def test_margin_out_of_range_is_refused():
    with pytest.raises(ValueError, match=r"memory_margin=1\.5"):
        MemoryCheck(margin=1.5)
