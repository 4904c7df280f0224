"""NaN/Inf losses and gradients never reach the weights: ``nan_guard.policy=stop`` ends the run before
the bad update naming the step and the last good checkpoint; ``skip`` drops that update, up to a cap."""

from __future__ import annotations

from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from kvforge.training.lightning_cli import KVForgeCLI
from kvforge.training.module import KVForgeLM
from kvforge.training.numerics import NonFiniteError, NonFiniteGuard
from kvforge.training.optim import OptimizerConfig
from tests.training.helpers import cli_args, tiny_config, tiny_corpus, tiny_data, tiny_yaml, trainer


class PoisonedLM(KVForgeLM):
    """Returns a NaN loss at the optimizer steps in ``poisoned`` (0-based: steps already done)."""

    def __init__(self, poisoned: set[int], **kwargs) -> None:
        super().__init__(**kwargs)
        self.poisoned = poisoned

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * float("nan") if self.global_step in self.poisoned else loss


class InfGradient(pl.Callback):
    """Puts an Inf into one gradient at optimizer step ``step`` (the loss stays finite)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_after_backward(self, trainer, pl_module) -> None:
        if trainer.global_step == self.step:
            next(pl_module.model.parameters()).grad[0, 0] = float("inf")


class Snapshots(pl.Callback):
    """Weights before and after each optimizer step."""

    def __init__(self) -> None:
        self.before: dict[int, dict] = {}
        self.after: dict[int, dict] = {}

    def _copy(self, pl_module) -> dict:
        return {name: p.detach().clone() for name, p in pl_module.model.named_parameters()}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.before[trainer.global_step] = self._copy(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.after[trainer.global_step - 1] = self._copy(pl_module)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("nonfinite")
    return tiny_data(tiny_corpus(root, chars=4_000), root / "cache")


def _module(poisoned=()) -> PoisonedLM:
    torch.manual_seed(0)
    optim = OptimizerConfig(lr=3e-3, warmup_steps=1, total_steps=6, weight_decay=0.1)
    return PoisonedLM(set(poisoned), model=tiny_config(), optim=optim)


def _all_finite(module) -> bool:
    return all(torch.isfinite(p).all() for p in module.model.parameters())


def test_stop_policy_ends_the_run_before_the_nan_update_naming_step_and_checkpoint(data, tmp_path):
    module = _module(poisoned={3})
    checkpoints = ModelCheckpoint(dirpath=tmp_path, save_last=True, every_n_train_steps=2)
    run = trainer(tmp_path / "run", 6, callbacks=[NonFiniteGuard(), checkpoints])
    with pytest.raises(NonFiniteError, match=r"global step 3 \(loss=nan") as error:
        run.fit(module, datamodule=data)
    assert str(tmp_path / "last.ckpt") in str(error.value)
    assert run.global_step == 3 and _all_finite(module)


def test_stop_policy_catches_an_infinite_gradient_with_a_finite_loss(data, tmp_path):
    module = _module()
    run = trainer(tmp_path, 6, callbacks=[NonFiniteGuard(), InfGradient(step=2)])
    with pytest.raises(NonFiniteError, match=r"global step 2 .*gradient norm=inf.*no checkpoint was written"):
        run.fit(module, datamodule=data)
    assert _all_finite(module)


def test_skip_policy_leaves_the_weights_of_the_bad_step_untouched_and_continues(data, tmp_path):
    module, snapshots, guard = _module(poisoned={3}), Snapshots(), NonFiniteGuard(policy="skip")
    run = trainer(tmp_path, 6, callbacks=[guard, snapshots])
    with pytest.warns(UserWarning, match="skipped the update of global step 3"):
        run.fit(module, datamodule=data)
    assert run.global_step == 6 and guard.skipped_steps == [3] and _all_finite(module)
    for name, before in snapshots.before[3].items():
        assert torch.equal(snapshots.after[3][name], before), name  # no update, no weight decay
    assert any(not torch.equal(snapshots.after[4][n], b) for n, b in snapshots.before[4].items())


def test_skip_policy_stops_after_too_many_bad_steps_in_a_row(data, tmp_path):
    module = _module(poisoned={2, 3, 4})
    run = trainer(tmp_path, 6, callbacks=[NonFiniteGuard(policy="skip", max_consecutive_skips=2)])
    with pytest.raises(NonFiniteError, match=r"global step 4 .*3 bad steps in a row > nan_guard"):
        run.fit(module, datamodule=data)
    assert _all_finite(module)


@pytest.mark.parametrize(
    ("options", "field"), [({"policy": "ignore"}, "policy"), ({"max_consecutive_skips": 0}, "max")]
)
def test_bad_guard_options_are_refused(options, field):
    with pytest.raises(ValueError, match=f"nan_guard.{field}"):
        NonFiniteGuard(**options)


def test_train_py_stops_on_nan_by_default(tmp_path):
    config = tiny_yaml(tmp_path, tiny_corpus(tmp_path, chars=4_000), tmp_path / "cache")
    cli = KVForgeCLI(args=cli_args("fit", config, tmp_path / "run")[1:], run=False)
    guards = [c for c in cli.trainer.callbacks if isinstance(c, NonFiniteGuard)]
    assert len(guards) == 1 and guards[0].policy == "stop"


def _fake_trainer(scaler):
    strategy = SimpleNamespace(reduce_boolean_decision=lambda decision, all: decision)
    return SimpleNamespace(
        precision_plugin=SimpleNamespace(scaler=scaler),
        strategy=strategy,
        global_step=7,
        checkpoint_callbacks=[],
        ckpt_path=None,
    )


@pytest.mark.parametrize(
    ("scaler", "stops"), [(None, True), (object(), False)], ids=["bf16-or-fp32", "fp16-loss-scaling"]
)
def test_overflowing_gradients_are_left_to_fp16_loss_scaling(scaler, stops):
    module = torch.nn.Linear(2, 2)
    module.weight.grad = torch.full((2, 2), float("inf"))
    guard, trainer_ = NonFiniteGuard(), _fake_trainer(scaler)
    guard.on_before_backward(trainer_, module, torch.tensor(1.0))
    if stops:
        with pytest.raises(NonFiniteError, match="global step 7"):
            guard.on_before_optimizer_step(trainer_, module, None)
    else:
        guard.on_before_optimizer_step(trainer_, module, None)
