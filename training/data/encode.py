"""From pieces of text (or chat records) to one token stream: tokenization in parallel worker processes,
then documents joined with the checkpoint's BOS/EOS conventions.

Pieces are grouped into batches of about ``BATCH_CHARS`` characters. With ``num_proc > 1`` the batches go
to a pool of forked processes, at most ``2 · num_proc`` in flight (memory stays bounded whatever the
corpus size), and come back in order, so the stream is the same for every ``num_proc``.
"""

from __future__ import annotations

import json
import os
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import chain
from pathlib import Path

import numpy as np

from .chat import encode_chat, has_chat_template
from .documents import Piece

BATCH_CHARS = 1 << 21


@dataclass(frozen=True)
class Conventions:
    """Special tokens around documents: ``bos_id`` starts every text document (None: no BOS), ``eos_id``
    goes between documents. Chat documents get what their template writes, and no extra BOS."""

    bos_id: int | None
    eos_id: int | None

    def key(self) -> dict:
        return {"bos": self.bos_id, "eos": self.eos_id}


def resolve_conventions(
    tokenizer, tokenizer_dir: str | Path | None, add_bos: bool | None, eos_token: str | None
) -> Conventions:
    """The checkpoint's conventions unless overridden: BOS when its tokenizer adds one by itself (Llama,
    DeepSeek; not Qwen, GPT-2), EOS = the tokenizer's, else the generation config's first ``eos_token_id``."""
    generation = _generation_config(tokenizer_dir)
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else generation.get("bos_token_id")
    if add_bos is None:
        add_bos = bos is not None and tokenizer("a", verbose=False)["input_ids"][:1] == [bos]
    if add_bos and bos is None:
        raise ValueError("data.add_bos=True but the tokenizer has no BOS token; set data.add_bos: false")
    if eos_token is not None:
        eos = tokenizer.convert_tokens_to_ids(eos_token)
        if eos is None or eos == tokenizer.unk_token_id:
            raise ValueError(f"data.eos_token={eos_token!r}: not a token of the tokenizer")
    else:
        eos = tokenizer.eos_token_id
        if eos is None:
            eos = generation.get("eos_token_id")
            eos = eos[0] if isinstance(eos, list) and eos else eos
    return Conventions(bos if add_bos else None, eos)


def _generation_config(directory: str | Path | None) -> dict:
    path = Path(directory) / "generation_config.json" if directory else None
    return json.loads(path.read_text()) if path is not None and path.is_file() else {}


@dataclass
class Encoded:
    """A batch's token ids, flat, with each piece's length and (chat) loss mask."""

    ids: np.ndarray  # int64
    lengths: np.ndarray  # int64, one per piece
    mask: np.ndarray | None  # uint8 like ids, or None when every token carries loss


def encode_texts(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of ``texts`` without special tokens. The Rust tokenizer's ``encode_batch_fast`` gives the
    same ids as ``tokenizer(texts)`` about twice as fast (it computes no character offsets)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and hasattr(backend, "encode_batch_fast"):
        return [encoding.ids for encoding in backend.encode_batch_fast(texts, add_special_tokens=False)]
    return tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]


def encode_batch(tokenizer, batch: list[Piece]) -> Encoded:
    chat = [piece.messages is not None for piece in batch]
    if not any(chat):
        rows = encode_texts(tokenizer, [p.text for p in batch])
        masks = None
    else:
        if not has_chat_template(tokenizer):
            raise ValueError(
                "data: a messages_field source needs a tokenizer with a chat template (its "
                "tokenizer_config.json has no chat_template)"
            )
        rows, masks = [], []
        for piece in batch:
            ids, mask = (
                encode_chat(tokenizer, piece.messages)
                if piece.messages is not None
                else (encode_texts(tokenizer, [piece.text])[0], None)
            )
            rows.append(ids)
            masks.append(mask if mask is not None else [1] * len(ids))
    lengths = np.fromiter(map(len, rows), dtype=np.int64, count=len(rows))
    total = int(lengths.sum())
    flat = np.fromiter(chain.from_iterable(rows), dtype=np.int64, count=total)
    flat_mask = (
        None if masks is None else np.fromiter(chain.from_iterable(masks), dtype=np.uint8, count=total)
    )
    return Encoded(flat, lengths, flat_mask)


def piece_chars(piece: Piece) -> int:
    return len(piece.text) + sum(len(m["content"]) for m in piece.messages or ())


def batches(pieces: Iterable[Piece]) -> Iterator[list[Piece]]:
    batch, chars = [], 0
    for piece in pieces:
        batch.append(piece)
        chars += piece_chars(piece)
        if chars >= BATCH_CHARS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def encode_pieces(
    pieces: Iterable[Piece], tokenizer, num_proc: int = 1
) -> Iterator[tuple[list[Piece], Encoded]]:
    """``(batch, its encoding)`` in order; ``num_proc > 1`` encodes in a process pool, started only once
    there is a second batch (a small corpus never pays for it)."""
    stream = batches(pieces)
    first = next(stream, None)
    if first is None:
        return
    second = next(stream, None)
    if num_proc <= 1 or second is None:
        for batch in (first, second):
            if batch is not None:
                yield batch, encode_batch(tokenizer, batch)
        for batch in stream:
            yield batch, encode_batch(tokenizer, batch)
        return
    yield from _pool_encode(chain((first, second), stream), tokenizer, num_proc)


def _pool_encode(stream: Iterator[list[Piece]], tokenizer, num_proc: int):
    import multiprocessing

    # Workers are forked: a tokenizer that already ran its thread pool would deadlock in a child, so the
    # children start with tokenizers' parallelism off (each is one process of the pool anyway).
    previous = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        pool = multiprocessing.get_context("fork").Pool(num_proc, _init_worker, (tokenizer,))
    finally:
        if previous is None:
            del os.environ["TOKENIZERS_PARALLELISM"]
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = previous
    try:
        pending: deque = deque()
        for batch in stream:
            pending.append((batch, pool.apply_async(_encode_in_worker, (batch,))))
            if len(pending) >= 2 * num_proc:
                done, result = pending.popleft()
                yield done, result.get()
        while pending:
            done, result = pending.popleft()
            yield done, result.get()
    finally:
        pool.terminate()
        pool.join()


_WORKER_TOKENIZER = None


def _init_worker(tokenizer) -> None:
    global _WORKER_TOKENIZER
    _WORKER_TOKENIZER = tokenizer


def _encode_in_worker(batch: list[Piece]) -> Encoded:
    return encode_batch(_WORKER_TOKENIZER, batch)


class DocumentJoiner:
    """Joins encoded pieces into one stream: EOS between documents (never after the last), BOS at the
    start of each text document. The EOS inherits the loss of the token before it (an assistant turn's
    end is followed by a scored EOS, a prompt's is not); BOS and text tokens carry loss."""

    def __init__(self, conventions: Conventions, what: str) -> None:
        self.conventions, self.what = conventions, what
        self.n_tokens = 0
        self.doc_starts: list[int] = []
        self.at_document_start = True
        self.last_mask = 1

    def join(self, batch: list[Piece], encoded: Encoded) -> tuple[np.ndarray, np.ndarray]:
        """The batch's stream tokens and loss mask (uint8), appended after everything joined so far."""
        parts, masks = [], []
        offsets = np.concatenate(([0], np.cumsum(encoded.lengths)))
        length = self.n_tokens
        for index, piece in enumerate(batch):
            ids = encoded.ids[offsets[index] : offsets[index + 1]]
            mask = (
                encoded.mask[offsets[index] : offsets[index + 1]]
                if encoded.mask is not None
                else np.ones(len(ids), dtype=np.uint8)
            )
            if self.at_document_start:
                head, head_mask = [], []
                if self.doc_starts:
                    head.append(self.eos())
                    head_mask.append(self.last_mask)
                self.doc_starts.append(length + len(head))
                if self.conventions.bos_id is not None and piece.messages is None:
                    head.append(self.conventions.bos_id)
                    head_mask.append(1)
                parts.append(np.asarray(head, dtype=np.int64))
                masks.append(np.asarray(head_mask, dtype=np.uint8))
                length += len(head)
                self.at_document_start = False
            parts.append(ids)
            masks.append(mask)
            length += len(ids)
            if len(mask):
                self.last_mask = int(mask[-1])
            self.at_document_start = piece.ends_document
        self.n_tokens = length
        return np.concatenate(parts), np.concatenate(masks)

    def eos(self) -> int:
        if self.conventions.eos_id is None:
            raise ValueError(
                f"data.{self.what}: the tokenizer has no EOS token to put between documents; use a tokenizer "
                "with one, set data.eos_token, or keep the text as a single document"
            )
        return self.conventions.eos_id
