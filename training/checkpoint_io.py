"""Crash-safe Lightning checkpoints: a SIGKILL mid-save never costs the previous good checkpoint.

Lightning 2.6's ``TorchCheckpointIO`` serialises into memory and writes through an fsspec transaction,
whose local temporary lives in the system temp directory (``tempfile.mkstemp()``, not next to the
target). Committing is ``shutil.move``: where /tmp is another filesystem (node-local disk, checkpoints
on NFS/Lustre) that is a copy *into* ``last.ckpt`` itself, so a kill during it leaves a truncated file
in place of the previous good one; nothing is fsynced either. :class:`AtomicCheckpointIO` streams the
checkpoint into a temporary sibling, fsyncs it, ``os.replace``s it over the target and fsyncs the
directory (``kvforge.conversion.atomic_file``). Loading defaults to ``torch.load(weights_only=True)``.
Remote URLs (``s3://`` ...) keep Lightning's object-store upload, which is atomic on those stores.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_warn

from kvforge.conversion.atomic import atomic_file, remove_stale_temporaries


def _is_local(path: Any) -> bool:
    return "://" not in str(path) or str(path).startswith("file://")


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local writes are atomic and durable, and whose loads are
    ``weights_only`` unless the caller passes ``weights_only=False`` (CLI: ``--weights_only false``)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if not _is_local(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        if storage_options is not None:
            raise TypeError(f"storage_options={storage_options!r}: local checkpoints take none")
        path = Path(str(path).removeprefix("file://"))
        stale = remove_stale_temporaries(path)
        if stale:
            rank_zero_warn(f"Removed {len(stale)} partial checkpoint(s) an interrupted save left: {stale}")
        with atomic_file(path) as tmp, open(tmp, "wb") as handle:
            torch.save(checkpoint, handle)

    def load_checkpoint(
        self, path, map_location=lambda storage, loc: storage, weights_only: bool | None = None
    ):
        if weights_only is None:
            weights_only = True  # a .ckpt is a pickle: never run code from one unless the user says so
        if _is_local(path) and not get_filesystem(path).exists(path):
            raise FileNotFoundError(f"Checkpoint file not found: {path}")
        try:
            return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)
        except Exception as err:
            error = load_error(path, err, weights_only)
            if error is None:
                raise
            raise error from err


def load_error(path, err: Exception, weights_only: bool) -> ValueError | None:
    """The clear error for a checkpoint ``torch.load`` failed on (None: not one we can explain)."""
    if "PytorchStreamReader" in str(err):
        return ValueError(f"{path}: not a complete checkpoint, truncated or corrupted ({err})")
    if weights_only and _is_unpickling_error(err):
        return ValueError(
            f"{path}: the checkpoint holds objects that torch.load(weights_only=True) refuses to unpickle "
            f"({_unpickler_reason(err)}). Loading it could run code; if you trust its origin, pass --weights_only false "
            "(Trainer.fit(..., weights_only=False))"
        )
    return None


def _unpickler_reason(err: Exception) -> str:
    """torch's message is a page long; its one informative sentence names the refused global."""
    text = str(err)
    marker = "WeightsUnpickler error: "
    if marker in text:
        return text.split(marker, 1)[1].split(" was not an allowed global")[0].split("\n")[0]
    return text.splitlines()[0] if text else type(err).__name__


def _is_unpickling_error(err: Exception) -> bool:
    import pickle

    return isinstance(err, pickle.UnpicklingError) or "Weights only load failed" in str(err)
