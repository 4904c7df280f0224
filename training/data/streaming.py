"""Streaming mode: tokenize and pack on the fly in the DataLoader workers, for hub sources and corpora too
large to prepare. Step 1 starts after O(batch) work: each worker reads and tokenizes only what its next
blocks need.

Sharding: the stream of a rank's ``W`` workers over ``R`` ranks has ``R · W`` shards; shard ``g`` takes
the documents ``d`` of every source with ``d mod (R · W) = g`` (every shard reads the records, only its
own are tokenized), so no document is read twice or skipped. Each document becomes
``[BOS] tokens EOS`` (EOS after every document, the checkpoint's conventions as in the prepared path);
a shard packs each source's documents into blocks of ``B + 1`` tokens (consecutive blocks share one,
like ``PackedBlocks``) and draws each block's source with probability proportional to its weight, from a
generator seeded by ``(seed, shard, block number)``. A source's ``max_tokens`` is shared evenly by the
shards: each reads ``ceil(max_tokens / shards)`` tokens of it per pass (the last document cut there), then
starts the next pass.

Exact resume: every block carries its shard's cursor after it (blocks emitted, and per source the pass,
the first document still in the buffer, how many of its tokens were used and how many tokens of the
pass came before it), the DataModule keeps the
cursor of the last *consumed* batch of each shard, and a resumed worker starts from it: it re-reads (but
does not re-tokenize) the records before that document. Workers take over shards rotated by the number
of consumed batches, so the DataLoader's round robin resumes in the uninterrupted order.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from kvforge.kernels.cross_entropy import IGNORE_INDEX

from .documents import Piece
from .encode import Conventions, DocumentJoiner, Encoded, encode_batch, piece_chars
from .prepare import source_pieces
from .sources import Source

ENCODE_CHARS = 1 << 14  # text tokenized per call while filling a buffer


def documents(pieces: Iterator[Piece]) -> Iterator[list[Piece]]:
    """Group pieces into documents (a long ``.txt`` document comes in several pieces)."""
    document: list[Piece] = []
    for piece in pieces:
        document.append(piece)
        if piece.ends_document:
            yield document
            document = []
    if document:
        yield document


class _Cursor:
    """One source's documents in one shard, tokenized into a buffer as blocks need them."""

    def __init__(self, source, shard, n_shards, tokenizer, conventions, state) -> None:
        self.source, self.shard, self.n_shards = source, shard, n_shards
        self.tokenizer, self.conventions = tokenizer, conventions
        epoch, first_doc, self.dropped, self.pass_tokens = state
        self.skip = self.dropped  # a resumed cursor re-tokenizes its first document and skips what was used
        # A token budget is shared evenly by the streams: each reads that many tokens per pass, then restarts.
        self.budget = -(-source.max_tokens // n_shards) if source.max_tokens else None
        # (pass, document index, length, tokens of the pass before it) of the documents in the buffer
        self.buffered: deque = deque()
        self.ids = np.empty(0, dtype=np.int64)
        self.mask = np.empty(0, dtype=np.uint8)
        self.next = (epoch, first_doc)
        self.reader = self._documents(epoch, first_doc)

    def _documents(self, epoch: int, first_doc: int) -> Iterator[tuple[int, int, list[Piece]]]:
        while True:
            mine = seen = 0
            for index, document in enumerate(documents(source_pieces(self.source))):
                seen += 1
                if index % self.n_shards == self.shard:
                    mine += 1
                    if index >= first_doc:
                        yield epoch, index, document
            if mine == 0:
                raise ValueError(
                    f"data.{self.source.name}: {seen} document(s), fewer than "
                    f"the {self.n_shards} streams (ranks × DataLoader workers) that share it; streaming gives "
                    "each stream whole documents, so use fewer workers or split the text into documents "
                    "(txt_separator)"
                )
            epoch, first_doc = epoch + 1, 0

    def state(self) -> tuple[int, int, int, int]:
        """(pass, first document in the buffer, its tokens already used, tokens of the pass before it)."""
        if self.buffered:
            epoch, index, _, before = self.buffered[0]
            return epoch, index, self.dropped, before
        return (*self.next, 0, self.pass_tokens)

    def take(self, length: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The next ``length + 1`` tokens, their loss mask and document ids; ``length`` of them are used up."""
        while len(self.ids) < length + 1:
            self._fill()
        ids, mask = self.ids[: length + 1], self.mask[: length + 1]
        ends = np.cumsum([entry[2] for entry in self.buffered]) - self.dropped
        document_ids = np.searchsorted(ends, np.arange(length), side="right")
        self.ids, self.mask = self.ids[length:], self.mask[length:]
        self.dropped += length
        while self.buffered and self.buffered[0][2] <= self.dropped:
            self.dropped -= self.buffered.popleft()[2]
        return ids, mask, document_ids - document_ids[0]

    def _fill(self) -> None:
        batch, owners, chars = [], [], 0
        while chars < ENCODE_CHARS:
            epoch, index, document = next(self.reader)
            self.next = (epoch, index + 1)
            batch.extend(document)
            owners.append((epoch, index, len(document)))
            chars += sum(map(piece_chars, document))
        encoded = encode_batch(self.tokenizer, batch)
        offsets = np.concatenate(([0], np.cumsum(encoded.lengths)))
        first = 0
        parts, masks = [self.ids], [self.mask]
        for epoch, index, n_pieces in owners:
            joiner = DocumentJoiner(self.conventions, self.source.name)
            document = batch[first : first + n_pieces]
            sub = Encoded(
                encoded.ids[offsets[first] : offsets[first + n_pieces]],
                encoded.lengths[first : first + n_pieces],
                None if encoded.mask is None else encoded.mask[offsets[first] : offsets[first + n_pieces]],
            )
            ids, mask = joiner.join(document, sub)
            ids = np.append(ids, joiner.eos())
            mask = np.append(mask, mask[-1] if len(mask) else 1).astype(np.uint8)
            if self.budget is not None:
                ids, mask = ids[: self.budget - self.pass_tokens], mask[: self.budget - self.pass_tokens]
            parts.append(ids)
            masks.append(mask)
            self.buffered.append((epoch, index, len(ids), self.pass_tokens))
            first += n_pieces
            if self.budget is not None:
                self.pass_tokens += len(ids)
                if self.pass_tokens >= self.budget:  # the pass ends here; the documents read after it wait
                    self.pass_tokens, self.next = 0, (epoch + 1, 0)
                    self.reader = self._documents(epoch + 1, 0)
                    break
        self.ids, self.mask = np.concatenate(parts)[self.skip :], np.concatenate(masks)[self.skip :]
        self.skip = 0


class StreamingBlocks(IterableDataset):
    """Endless ``{"input_ids", "targets", "document_ids", "stream_state"}`` blocks of one rank.

    ``resume`` (set by the DataModule before the loader starts) maps a shard to its cursor, and
    ``batches_consumed`` rotates the workers' shards so the round robin continues where it stopped."""

    def __init__(
        self,
        sources: list[Source],
        tokenizer,
        conventions: Conventions,
        block_size: int,
        seed: int,
    ) -> None:
        self.sources, self.tokenizer, self.conventions = sources, tokenizer, conventions
        self.block_size, self.seed = block_size, seed
        weights = np.asarray([s.weight for s in sources], dtype=np.float64)
        self.probabilities = weights / weights.sum()
        self.rank, self.world = 0, 1
        self.resume: dict[int, list[int]] = {}
        self.batches_consumed = 0

    def __iter__(self):
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        local = (worker + self.batches_consumed) % workers  # the shard this worker continues
        yield from self.shard_blocks(self.rank * workers + local, self.world * workers)

    def shard_blocks(self, shard: int, n_shards: int) -> Iterator[dict[str, torch.Tensor]]:
        state = self.resume.get(shard)
        blocks = state[1] if state else 0
        cursors = [
            _Cursor(
                source,
                shard,
                n_shards,
                self.tokenizer,
                self.conventions,
                tuple(state[2 + 4 * i : 6 + 4 * i]) if state else (0, 0, 0, 0),
            )
            for i, source in enumerate(self.sources)
        ]
        while True:
            choice = np.random.default_rng([self.seed, shard, blocks]).choice(
                len(cursors), p=self.probabilities
            )
            ids, mask, document_ids = cursors[choice].take(self.block_size)
            blocks += 1
            window = torch.from_numpy(ids)
            targets = window[1:].masked_fill(torch.from_numpy(mask[1:] == 0), IGNORE_INDEX)
            cursor_state = [shard, blocks, *(v for c in cursors for v in c.state())]
            yield {
                "input_ids": window[:-1],
                "targets": targets,
                "document_ids": torch.from_numpy(document_ids.astype(np.int64)),
                "stream_state": torch.tensor(cursor_state, dtype=torch.int64),
            }
