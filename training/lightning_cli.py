"""``train.py``: LightningCLI around :class:`KVForgeLM` and :class:`TextDataModule`.

    python train.py fit --config configs/pretrain/gqa.yaml [--trainer.devices 2 --trainer.strategy ddp]
    python train.py fit --config configs/uptrain/gqa2.yaml --ckpt_path last     # resume
    python train.py validate --config ... --ckpt_path runs/<name>/checkpoints/last.ckpt
    python train.py fit --config ... --print_config                             # the resolved config

Every field is a command-line override (``--model.optim.lr 1e-3``); unknown keys are errors. Each run
has a name (``--name``, default the config file's name) and one directory, ``runs/<name>/``, holding its
logs, ``checkpoints/`` (so ``--ckpt_path last`` finds them) and the exported ``hf/`` model.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.plugins.io import CheckpointIO

from .callbacks import HFExport, TokenThroughput
from .checkpoint_io import AtomicCheckpointIO, load_error
from .data import TextDataModule
from .memory_check import MemoryCheck
from .module import KVForgeLM
from .numerics import NonFiniteGuard

RUNS_DIR = Path("runs")


def default_precision() -> str:
    return "bf16-mixed" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "32-true"


TRAINER_DEFAULTS = {
    "logger": {"class_path": "kvforge.training.loggers.WandbLogger"},
    "precision": default_precision(),
    "gradient_clip_val": 1.0,
    "log_every_n_steps": 10,
}


class LogConfigCallback(SaveConfigCallback):
    """Besides writing ``config.yaml`` into the log directory, log the whole resolved configuration and
    the architecture's figures (parameters, KV bytes/token, FLOPs/token) as the run's hyperparameters."""

    def save_config(self, trainer, pl_module, stage: str) -> None:
        if trainer.logger is None:
            return
        config = yaml.safe_load(self.parser.dump(self.config, skip_none=False, skip_validation=True))
        trainer.logger.log_hyperparams({"config": config, **pl_module.architecture_summary()})


class KVForgeCLI(LightningCLI):
    def __init__(self, args=None, run: bool = True, **kwargs) -> None:
        super().__init__(
            KVForgeLM,
            TextDataModule,
            save_config_callback=LogConfigCallback,
            save_config_kwargs={"overwrite": True},
            trainer_defaults=TRAINER_DEFAULTS,
            seed_everything_default=0,
            auto_configure_optimizers=False,
            args=args,
            run=run,
            **kwargs,
        )

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument(
            "--name",
            type=str | None,
            default=None,
            help="run name; runs/<name>/ holds its outputs (default: config stem)",
        )
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.save_last": True, "checkpoint.every_n_train_steps": 500})
        parser.add_lightning_class_args(TokenThroughput, "throughput")
        parser.add_lightning_class_args(HFExport, "export")
        parser.add_lightning_class_args(NonFiniteGuard, "nan_guard")
        parser.add_argument(
            "--memory_check",
            type=bool,
            default=True,
            help="before building the model, stop if the estimated memory exceeds what the device has free",
        )
        parser.add_argument(
            "--memory_margin",
            type=float,
            default=0.1,
            help="share of the free memory the check keeps in reserve",
        )

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        sources = config.get("config") or []
        name = config.name or (Path(str(sources[-1])).stem if sources else "kvforge")
        config.name = name
        run_dir = Path(config.trainer.default_root_dir or RUNS_DIR / name)
        config.trainer.default_root_dir = str(run_dir)
        if config.checkpoint.dirpath is None:
            config.checkpoint.dirpath = str(run_dir / "checkpoints")
        logger = config.trainer.logger
        if hasattr(logger, "class_path") and logger.class_path.endswith(".WandbLogger"):
            logger.init_args.name = logger.init_args.get("name") or name
            if logger.init_args.get("save_dir") in (None, "runs"):
                logger.init_args.save_dir = str(run_dir)

    def _parse_ckpt_path(self) -> None:
        """LightningCLI reads ``--ckpt_path``'s hyperparameters with ``torch.load(weights_only=True)``
        before anything else: turn its raw unpickling errors into the clear ones, and honour
        ``--weights_only false`` (the explicit opt-in) by leaving the load to the Trainer."""
        config = self.config.get(self.config.get("subcommand") or "", None)
        if config is not None and config.get("weights_only") is False:
            return
        try:
            super()._parse_ckpt_path()
        except Exception as err:
            error = load_error(config.get("ckpt_path"), err, weights_only=True) if config else None
            if error is None:
                raise
            raise error from err

    def instantiate_trainer(self, **kwargs):
        """Crash-safe checkpoint writes unless the user configured a CheckpointIO of their own, and the
        memory check unless ``--memory_check false``."""
        config = self.config_init[self.subcommand] if self.subcommand else self.config_init
        plugins = config.trainer.get("plugins") or []
        plugins = list(plugins) if isinstance(plugins, list) else [plugins]
        if not any(isinstance(plugin, CheckpointIO) for plugin in plugins):
            plugins.append(AtomicCheckpointIO())
        callbacks = config.trainer.get("callbacks") or []
        callbacks = list(callbacks) if isinstance(callbacks, list) else [callbacks]
        if config.get("memory_check", True):
            callbacks.append(MemoryCheck(margin=config.memory_margin))
        return super().instantiate_trainer(plugins=plugins, callbacks=callbacks, **kwargs)

    def before_fit(self) -> None:
        """Check the data against the model in this process, before any worker process starts."""
        config = self.model.data_config()  # without converting: rank 0 does that, once
        self.datamodule.check(config.vocab_size, config.max_seq_len, self.model.tokenizer_source)


def main(args=None) -> None:
    """``train.py``: what the input is wrong about (a checkpoint, a config value, a data file) is one
    line on stderr and exit status 2, as every ``kvforge`` command does; ``KVFORGE_TRACEBACK=1`` shows
    the traceback instead."""
    try:
        KVForgeCLI(args=args)
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        if os.environ.get("KVFORGE_TRACEBACK"):
            raise
        print(f"train.py: error: {' '.join(str(err).split())}", file=sys.stderr)
        raise SystemExit(2) from None
