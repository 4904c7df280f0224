"""llama.cpp GGUF files: import (dequantised through transformers' GGUF reader) into a model directory."""

from .cache import is_gguf, model_directory
from .reading import PROVENANCE_FILE, GGUFSource, import_gguf, read_provenance

__all__ = ["PROVENANCE_FILE", "GGUFSource", "import_gguf", "is_gguf", "model_directory", "read_provenance"]
