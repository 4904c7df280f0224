"""Hugging Face import/export and checkpoint transforms (pure ``(config, state_dict)`` functions)."""

from .atomic import atomic_directory, atomic_file
from .checkpoint import check_tensors
from .families import FAMILIES, ExportPlan, plan_export
from .pretrained import Pretrained, load_config, load_pretrained, save_pretrained

__all__ = [
    "FAMILIES",
    "ExportPlan",
    "Pretrained",
    "atomic_directory",
    "atomic_file",
    "check_tensors",
    "load_config",
    "load_pretrained",
    "plan_export",
    "save_pretrained",
]
