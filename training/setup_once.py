"""Setup that happens once per run, not once per rank.

A multi-process run with ``model.convert`` converts on global rank 0 only (``KVForgeLM.prepare_data``,
which Lightning runs on rank 0 while the other ranks wait on a barrier without a timeout) into
``<run dir>/converted/``, an ordinary model directory written atomically. Every rank then reads the
config from it, and the weights: each DDP rank all of them, FSDP2 rank 0 alone, broadcasting to the
others' shards (``KVForgeLM.configure_model``). ``conversion.json`` beside the weights records the
recipe and the parameters the conversion changed; a later run (a resume) with the same recipe reuses
the directory instead of converting again. The conversion streams (:func:`~.model_source.convert_to_directory`). The run directory must be visible to every node (it holds the
distributed checkpoints too).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kvforge.conversion.atomic import atomic_file

from .model_source import CalibrationConfig, Convert, convert_to_directory

CONVERTED_DIR = "converted"
RECIPE_FILE = "conversion.json"


def conversion_recipe(
    init_from: str, convert: Convert, calibration: CalibrationConfig | None
) -> dict[str, Any]:
    """What the converted directory must have been made from, as plain JSON."""
    calib = None if calibration is None else {**calibration.__dict__, "files": list(calibration.files)}
    return json.loads(
        json.dumps({"init_from": str(Path(init_from).resolve()), "convert": convert, "calibration": calib})
    )


def prepare_converted(
    run_dir: str | Path, recipe: dict[str, Any], calibration: CalibrationConfig | None
) -> Path:
    """Rank 0: ``<run_dir>/converted`` made from ``recipe`` (converted now unless a finished one matches)."""
    out = Path(run_dir) / CONVERTED_DIR
    if _stored_recipe(out) == recipe:
        return out
    (out / RECIPE_FILE).unlink(missing_ok=True)  # the marker goes first: a kill mid-conversion leaves none
    changed = convert_to_directory(recipe["init_from"], recipe["convert"], calibration, out)
    with atomic_file(out / RECIPE_FILE) as tmp:
        tmp.write_text(json.dumps({"recipe": recipe, "changed": sorted(changed)}, indent=1))
    return out


def read_converted(run_dir: str | Path, recipe: dict[str, Any]) -> tuple[Path, frozenset[str]]:
    """Every rank: the converted directory rank 0 prepared, and the parameters the conversion changed."""
    out = Path(run_dir) / CONVERTED_DIR
    if _stored_recipe(out) != recipe:
        raise FileNotFoundError(
            f"{out} holds no finished conversion of {recipe['init_from']} with convert={recipe['convert']}: "
            "global rank 0 writes it in prepare_data; is the run directory shared by every node?"
        )
    stored = json.loads((out / RECIPE_FILE).read_text())
    return out, frozenset(stored["changed"])


def _stored_recipe(out: Path) -> dict[str, Any] | None:
    marker = out / RECIPE_FILE
    return json.loads(marker.read_text())["recipe"] if marker.is_file() else None
