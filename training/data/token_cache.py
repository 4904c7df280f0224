"""Tokenize a document stream once into a memory-mapped token file, keyed by everything that
determines its content, so the next run with the same inputs starts instantly.

An entry is a directory ``<cache>/tokens/<key>/`` with ``tokens.bin`` (the stream: documents joined by
EOS, uint16 or uint32), ``doc_starts.npy`` (offset of each document's first token), for chat sources
``loss_mask.bin`` (uint8, 1 where the token is a target that carries loss) and ``meta.json``. The entry is
built in a temporary sibling directory and renamed into place when complete (after a last check that the
source did not change meanwhile): a failure or a kill leaves nothing half-written. Tokens go to disk
batch by batch, so memory stays bounded by a few batches of text whatever the corpus size.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kvforge.conversion import atomic_directory

from .documents import Piece
from .encode import Conventions, DocumentJoiner, encode_pieces

CACHE_FORMAT = 2


@dataclass
class TokenStream:
    tokens: np.ndarray  # 1-D memmap
    doc_starts: np.ndarray  # int64, ascending, doc_starts[0] == 0
    directory: Path | None
    loss_mask: np.ndarray | None = None  # uint8 memmap like tokens; None: every token carries loss

    def __len__(self) -> int:
        return len(self.tokens)


def cache_key(**inputs: object) -> str:
    payload = json.dumps({"format": CACHE_FORMAT, **inputs}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


def load_stream(directory: Path) -> TokenStream | None:
    """The cached stream in ``directory``, or None when there is no complete entry."""
    meta_file = directory / "meta.json"
    if not meta_file.is_file():
        return None
    meta = json.loads(meta_file.read_text())
    if meta.get("format") != CACHE_FORMAT:
        return None
    shape = (meta["n_tokens"],)
    tokens = np.memmap(directory / "tokens.bin", dtype=meta["dtype"], mode="r", shape=shape)
    mask = (
        np.memmap(directory / "loss_mask.bin", dtype=np.uint8, mode="r", shape=shape)
        if meta.get("loss_mask")
        else None
    )
    return TokenStream(tokens, np.load(directory / "doc_starts.npy"), directory, mask)


def token_dtype(vocab_size: int) -> str:
    return "uint16" if vocab_size <= np.iinfo(np.uint16).max + 1 else "uint32"


def tokenize_to_cache(
    pieces: Iterable[Piece],
    tokenizer,
    directory: Path,
    *,
    conventions: Conventions,
    what: str,
    num_proc: int = 1,
    max_tokens: int | None = None,
    loss_mask: bool = False,
    before_publish: Callable[[], None] | None = None,
) -> TokenStream:
    """Tokenize ``pieces`` into a new cache entry (at most ``max_tokens`` tokens). ``what`` names the data
    field in error messages; ``before_publish`` may raise to discard the entry (e.g. the source changed)."""
    dtype = token_dtype(len(tokenizer))
    joiner = DocumentJoiner(conventions, what)
    with atomic_directory(directory, overwrite=True) as tmp:
        with open(tmp / "tokens.bin", "wb") as tokens_out, open(tmp / "loss_mask.bin", "wb") as mask_out:
            for batch, encoded in encode_pieces(pieces, tokenizer, num_proc):
                before = joiner.n_tokens
                ids, mask = joiner.join(batch, encoded)
                if max_tokens is not None and joiner.n_tokens >= max_tokens:
                    keep = max_tokens - before
                    ids, mask, joiner.n_tokens = ids[:keep], mask[:keep], max_tokens
                    joiner.doc_starts = [s for s in joiner.doc_starts if s < max_tokens]
                ids.astype(dtype).tofile(tokens_out)
                if loss_mask:
                    mask.tofile(mask_out)
                if joiner.n_tokens == max_tokens:
                    break
        if joiner.n_tokens == 0:
            raise ValueError(f"data.{what}: the corpus is empty (no document with any text)")
        if not loss_mask:
            (tmp / "loss_mask.bin").unlink()
        np.save(tmp / "doc_starts.npy", np.asarray(joiner.doc_starts, dtype=np.int64))
        meta = {
            "format": CACHE_FORMAT,
            "n_tokens": joiner.n_tokens,
            "n_documents": len(joiner.doc_starts),
            "dtype": dtype,
            "loss_mask": loss_mask,
            **conventions.key(),
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        if before_publish is not None:
            before_publish()
    stream = load_stream(directory)
    assert stream is not None
    return stream
