"""llama.cpp GGUF files: import (dequantised through transformers' GGUF reader) into a model directory,
and export of a model as a GGUF file llama.cpp runs."""

from .cache import is_gguf, model_directory
from .reading import PROVENANCE_FILE, GGUFSource, import_gguf, read_provenance
from .writing import OUTTYPES, export_gguf, form_problems, gguf_plan

__all__ = [
    "OUTTYPES",
    "PROVENANCE_FILE",
    "GGUFSource",
    "export_gguf",
    "form_problems",
    "gguf_plan",
    "import_gguf",
    "is_gguf",
    "model_directory",
    "read_provenance",
]
