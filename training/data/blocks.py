"""Fixed-length training blocks over a token stream, and a sampler that can resume mid-epoch.

Block ``i`` of a span ``[start, end)`` reads tokens ``start + i·B … start + i·B + B`` (B + 1 tokens):
inputs are the first B, targets the last B, so consecutive blocks share one token and nothing is
dropped except the final partial block (fewer than B + 1 tokens left). Targets whose token carries no
loss (a chat prompt's, see ``chat``) are ``IGNORE_INDEX``.

Several sources make a :class:`MixtureBlocks`: their blocks side by side, and a per-pass order that draws
each sample's source with probability proportional to its weight (a seeded function of the pass number,
so the data position alone resumes it exactly, mixture included).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset, DistributedSampler

from kvforge.kernels.cross_entropy import IGNORE_INDEX

from .token_cache import TokenStream


class PackedBlocks(Dataset):
    """``{"input_ids", "targets", "document_ids"}`` int64 tensors of length ``block_size``.

    ``document_ids`` number the documents inside each block from 0 (a document continued from the
    previous block keeps 0): the input for packed-document attention masks."""

    def __init__(self, stream: TokenStream, start: int, end: int, block_size: int) -> None:
        if not 0 <= start <= end <= len(stream):
            raise ValueError(
                f"PackedBlocks: span [{start}, {end}) outside the stream of {len(stream)} tokens"
            )
        self.stream, self.start, self.end, self.block_size = stream, start, end, block_size
        self.n_blocks = max(0, (end - start - 1) // block_size)

    def __len__(self) -> int:
        return self.n_blocks

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not 0 <= index < self.n_blocks:
            raise IndexError(f"block {index} out of range (0..{self.n_blocks - 1})")
        first = self.start + index * self.block_size
        window = torch.from_numpy(self.stream.tokens[first : first + self.block_size + 1].astype(np.int64))
        positions = np.arange(first, first + self.block_size)
        document = np.searchsorted(self.stream.doc_starts, positions, side="right")
        targets = window[1:]
        if self.stream.loss_mask is not None:
            scored = torch.from_numpy(self.stream.loss_mask[first + 1 : first + self.block_size + 1] != 0)
            targets = targets.masked_fill(~scored, IGNORE_INDEX)
        return {
            "input_ids": window[:-1],
            "targets": targets,
            "document_ids": torch.from_numpy((document - document[0]).astype(np.int64)),
        }


class MixtureBlocks(Dataset):
    """The blocks of several sources, indexed one after the other; ``weights`` set :meth:`pass_order`."""

    def __init__(self, parts: list[PackedBlocks], weights: list[float]) -> None:
        self.parts, self.weights = parts, np.asarray(weights, dtype=np.float64)
        self.offsets = np.concatenate(([0], np.cumsum([len(p) for p in parts])))

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        part = int(np.searchsorted(self.offsets, index, side="right")) - 1
        if not 0 <= part < len(self.parts):
            raise IndexError(f"block {index} out of range (0..{len(self) - 1})")
        return self.parts[part][index - int(self.offsets[part])]

    def pass_order(self, seed: int, epoch: int) -> list[int]:
        """``len(self)`` block indices: each sample's source drawn by weight, then that source's blocks in
        a fresh permutation (cycled when the source is drawn more often than it has blocks)."""
        rng = np.random.default_rng([seed, epoch])
        live = np.asarray([len(p) > 0 for p in self.parts])
        probabilities = self.weights * live / (self.weights * live).sum()
        choices = rng.choice(len(self.parts), size=len(self), p=probabilities)
        order = np.empty(len(self), dtype=np.int64)
        for part, blocks in enumerate(self.parts):
            where = np.flatnonzero(choices == part)
            if not len(where):
                continue
            cycles = -(-len(where) // len(blocks))
            drawn = np.concatenate([rng.permutation(len(blocks)) for _ in range(cycles)])[: len(where)]
            order[where] = drawn + self.offsets[part]
        return order.tolist()

    def tokens(self) -> np.ndarray:
        """The spans' tokens, one source after the other."""
        return np.concatenate([p.stream.tokens[p.start : p.end] for p in self.parts])


@dataclass
class DataPosition:
    """Where training is in the data: the pass (epoch) in progress and how many of its samples the
    training steps of all ranks together consumed. Checkpointed, and read by the sampler."""

    epoch: int = 0
    samples_consumed: int = 0


class ResumableSampler(DistributedSampler):
    """``DistributedSampler`` (a seeded permutation per pass, one shard per rank, the same order on every
    rank) that starts each iteration at the shared :class:`DataPosition`, so a run restarted from a
    checkpoint, or an iterator Lightning re-creates mid-pass, continues with exactly the samples an
    uninterrupted run would see next.

    Lightning's ``set_epoch`` calls are ignored: its epoch counter counts a ``max_steps`` stop in mid-pass
    as a finished epoch, so the pass number comes from the position instead. Being a
    ``DistributedSampler``, Lightning uses it as is instead of wrapping it in one.
    """

    def __init__(self, dataset: Dataset, position: DataPosition, *, num_replicas: int, rank: int, seed: int):
        super().__init__(
            dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True
        )
        self.position = position

    def set_epoch(self, epoch: int) -> None:
        """Ignored on purpose, see the class docstring."""

    def __iter__(self):
        self.epoch = self.position.epoch
        # The first k·world samples of a pass are the first k of every rank's shard.
        skip = self.position.samples_consumed // self.num_replicas
        if isinstance(self.dataset, MixtureBlocks):
            order = self.dataset.pass_order(self.seed, self.epoch)[: self.total_size]
            return iter(order[self.rank : self.total_size : self.num_replicas][skip:])
        return iter(list(super().__iter__())[skip:])
