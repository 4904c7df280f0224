"""A callback that kills its own training process at a chosen moment, for the crash/resume tests.

``train.py fit ... --trainer.callbacks+=tests.training.faults.FaultInjector`` reads two variables:
``KVFORGE_TEST_LOSSES`` (a JSON-lines file each optimizer step appends its loss to) and
``KVFORGE_TEST_FAULT``: ``step:N`` SIGKILLs the process after optimizer step N (before any checkpoint
of that step), ``save:N`` SIGKILLs it halfway through writing ``last.ckpt`` at step N (half the bytes
written and fsynced). SIGKILL runs no cleanup: exactly what preemption or the OOM killer does.
"""

from __future__ import annotations

import io
import json
import os
import signal

import lightning.pytorch as pl
import torch


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


class FaultInjector(pl.Callback):
    def __init__(self) -> None:
        kind, _, step = os.environ.get("KVFORGE_TEST_FAULT", ":").partition(":")
        self.kind, self.step = kind, int(step) if step else None
        self.losses = os.environ.get("KVFORGE_TEST_LOSSES")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.losses:
            record = {
                "step": trainer.global_step,
                "epoch": trainer.current_epoch,
                "loss": outputs["loss"].item(),
            }
            with open(self.losses, "a") as handle:
                handle.write(json.dumps(record) + "\n")
        if self.kind == "step" and trainer.global_step == self.step:
            _die()

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        if self.kind != "save" or trainer.global_step != self.step:
            return
        real_save = torch.save

        def half_then_die(obj, handle, *args, **kwargs):
            if "last.ckpt" not in getattr(handle, "name", str(handle)):
                return real_save(obj, handle, *args, **kwargs)
            buffer = io.BytesIO()
            real_save(obj, buffer, *args, **kwargs)
            data = buffer.getvalue()
            handle.write(data[: len(data) // 2])
            handle.flush()
            os.fsync(handle.fileno())
            _die()

        torch.save = half_then_die  # this process dies in the next save of last.ckpt
