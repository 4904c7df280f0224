"""Tokenize a document stream once into a memory-mapped token file, keyed by everything that
determines its content, so the next run with the same inputs starts instantly.

An entry is a directory ``<cache>/tokens/<key>/`` with ``tokens.bin`` (the stream: documents joined by
EOS, uint16 or uint32), ``doc_starts.npy`` (offset of each document's first token) and ``meta.json``.
Each file is written to a temporary sibling and renamed into place, ``meta.json`` last: an entry
without it is incomplete and gets rebuilt. Tokens go to disk batch by batch, so memory stays bounded
by one batch of text whatever the corpus size.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kvforge.conversion import atomic_file

from .documents import Piece

CACHE_FORMAT = 1
BATCH_CHARS = 1 << 21


@dataclass
class TokenStream:
    tokens: np.ndarray  # 1-D memmap
    doc_starts: np.ndarray  # int64, ascending, doc_starts[0] == 0
    directory: Path

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
    tokens = np.memmap(directory / "tokens.bin", dtype=meta["dtype"], mode="r", shape=(meta["n_tokens"],))
    return TokenStream(tokens, np.load(directory / "doc_starts.npy"), directory)


def token_dtype(vocab_size: int) -> str:
    return "uint16" if vocab_size <= np.iinfo(np.uint16).max + 1 else "uint32"


def tokenize_to_cache(
    pieces: Iterable[Piece], tokenizer, directory: Path, *, add_bos: bool, what: str
) -> TokenStream:
    """Tokenize ``pieces`` into a new cache entry. ``what`` names the data field in error messages."""
    dtype = token_dtype(len(tokenizer))
    writer = _StreamWriter(tokenizer, dtype, add_bos, what)
    with atomic_file(directory / "tokens.bin") as tmp:
        with open(tmp, "wb") as out:
            batch: list[Piece] = []
            chars = 0
            for piece in pieces:
                batch.append(piece)
                chars += len(piece.text)
                if chars >= BATCH_CHARS:
                    writer.write(batch, out)
                    batch, chars = [], 0
            writer.write(batch, out)
        if writer.n_tokens == 0:
            raise ValueError(f"data.{what}: the corpus is empty (no document with any text)")
    with atomic_file(directory / "doc_starts.npy") as tmp, open(tmp, "wb") as out:
        np.save(out, np.asarray(writer.doc_starts, dtype=np.int64))
    meta = {
        "format": CACHE_FORMAT,
        "n_tokens": writer.n_tokens,
        "n_documents": len(writer.doc_starts),
        "dtype": dtype,
    }
    with atomic_file(directory / "meta.json") as tmp:
        tmp.write_text(json.dumps(meta, indent=2) + "\n")
    stream = load_stream(directory)
    assert stream is not None
    return stream


class _StreamWriter:
    """Appends tokenized pieces to the open file, EOS between documents (never after the last)."""

    def __init__(self, tokenizer, dtype: str, add_bos: bool, what: str) -> None:
        self.tokenizer, self.dtype, self.add_bos, self.what = tokenizer, dtype, add_bos, what
        self.n_tokens = 0
        self.doc_starts: list[int] = []
        self.at_document_start = True
        if add_bos and tokenizer.bos_token_id is None:
            raise ValueError("data.add_bos=True but the tokenizer has no BOS token")

    def write(self, batch: list[Piece], out) -> None:
        if not batch:
            return
        encoded = self.tokenizer([piece.text for piece in batch], add_special_tokens=False, verbose=False)[
            "input_ids"
        ]
        ids: list[int] = []
        for piece, piece_ids in zip(batch, encoded):
            if self.at_document_start:
                if self.doc_starts:
                    ids.append(self._eos())
                self.doc_starts.append(self.n_tokens + len(ids))
                if self.add_bos:
                    ids.append(self.tokenizer.bos_token_id)
                self.at_document_start = False
            ids.extend(piece_ids)
            self.at_document_start = piece.ends_document
        np.asarray(ids, dtype=self.dtype).tofile(out)
        self.n_tokens += len(ids)

    def _eos(self) -> int:
        eos = self.tokenizer.eos_token_id
        if eos is None:
            raise ValueError(
                f"data.{self.what}: the tokenizer has no EOS token to put between documents; use a tokenizer "
                "with one, or keep the text as a single document"
            )
        return eos
