"""Weights & Biases by default, offline when no API key is configured (never an error)."""

from __future__ import annotations

import netrc
import os

from lightning.pytorch.loggers import WandbLogger as LightningWandbLogger
from lightning.pytorch.utilities import rank_zero_info

WANDB_HOST = "api.wandb.ai"


def wandb_api_key_configured() -> bool:
    """``WANDB_API_KEY`` or a ``wandb login`` entry in ``~/.netrc``."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators(WANDB_HOST) is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


class WandbLogger(LightningWandbLogger):
    """Lightning's ``WandbLogger``; ``offline=None`` (default) goes online only with an API key.

    Offline runs are written under ``<save_dir>/wandb/offline-run-*``; ``wandb sync`` uploads them later.
    """

    def __init__(
        self,
        name: str | None = None,
        save_dir: str = "runs",
        project: str = "kvforge",
        offline: bool | None = None,
        **kwargs,
    ) -> None:
        if offline is None:
            offline = os.environ.get("WANDB_MODE") == "offline" or not wandb_api_key_configured()
            if offline:
                rank_zero_info(
                    f"W&B: no API key configured, logging offline to {save_dir}/wandb "
                    "(upload later with `wandb sync`)"
                )
        super().__init__(name=name, save_dir=save_dir, project=project, offline=offline, **kwargs)
