"""Hugging Face import/export and checkpoint transforms (pure ``(config, state_dict)`` functions)."""

from .atomic import atomic_directory, atomic_file
from .pretrained import Pretrained, load_pretrained, save_pretrained

__all__ = ["Pretrained", "atomic_directory", "atomic_file", "load_pretrained", "save_pretrained"]
