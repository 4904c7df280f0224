"""Training data: documents from files or datasets, a tokenized memory-mapped cache, packed blocks."""

from .blocks import PackedBlocks, ResumableSampler
from .datamodule import TextDataModule
from .documents import Piece, iter_pieces
from .token_cache import TokenStream, load_stream, tokenize_to_cache

__all__ = [
    "PackedBlocks",
    "Piece",
    "ResumableSampler",
    "TextDataModule",
    "TokenStream",
    "iter_pieces",
    "load_stream",
    "tokenize_to_cache",
]
