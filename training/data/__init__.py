"""Training data: sources (files, datasets, hub) mixed by weight, a tokenized memory-mapped cache prepared
in parallel, or streaming tokenization in the DataLoader workers; packed blocks with document ids."""

from .blocks import MixtureBlocks, PackedBlocks, ResumableSampler
from .datamodule import TextDataModule
from .documents import Piece, iter_pieces
from .sources import Source
from .streaming import StreamingBlocks
from .token_cache import TokenStream, load_stream, tokenize_to_cache

__all__ = [
    "MixtureBlocks",
    "PackedBlocks",
    "Piece",
    "ResumableSampler",
    "Source",
    "StreamingBlocks",
    "TextDataModule",
    "TokenStream",
    "iter_pieces",
    "load_stream",
    "tokenize_to_cache",
]
