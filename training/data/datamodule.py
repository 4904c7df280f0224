"""``TextDataModule``: text in, packed fixed-length token blocks out, with a resumable data order.

The data is a list of sources (``data.sources``, see ``sources``): local files, saved ``datasets``
directories or hub datasets, each with its own field, weight and token budget.

1. ``prepare_data`` (one process per node, Lightning's local rank 0; the other ranks wait): pick the
   tokenizer (``data.tokenizer``, else the model's ``init_from`` directory, else a byte-level BPE trained
   on the training text), then tokenize every source in ``num_proc`` processes into the memory-mapped
   cache (see ``prepare``), unless an entry for the same files (sizes, mtimes), tokenizer and settings
   already exists.
2. ``setup`` (every process): open the cached streams and cut them into blocks. Without ``val_files``
   the validation set is the *tail* ``val_fraction`` of each source's stream (contiguous, so no block
   of validation text sits next to a training block of the same passage). Several sources are mixed by
   weight (``blocks.MixtureBlocks``). ``streaming: true`` skips the preparation and tokenizes in the
   DataLoader workers instead (see ``streaming``).
3. Loaders: a seeded per-epoch shuffle sharded over data-parallel ranks; every step gets full batches
   (an incomplete last batch of an epoch is skipped, and reshuffled into the next epoch).

Exact resume: the checkpoint stores the data position (the pass in progress and how many of its samples
the training steps consumed, counted as they are consumed) and every new iterator starts there.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader

from kvforge.conversion import atomic_directory
from kvforge.conversion.loading import has_tokenizer, load_tokenizer

from .blocks import DataPosition, MixtureBlocks, PackedBlocks, ResumableSampler
from .encode import resolve_conventions
from .prepare import prepare_stream, source_pieces
from .sources import Source, resolve_sources
from .streaming import StreamingBlocks
from .token_cache import cache_key
from .tokenizer import tokenizer_fingerprint, train_byte_bpe

# The data position is restored through this DataModule's state_dict (see the module docstring), which
# Lightning's "dataloader is not resumable" check cannot see.
warnings.filterwarnings(
    "ignore", message="You're resuming from a checkpoint that ended before the epoch ended"
)


class TextDataModule(pl.LightningDataModule):
    """Args:
    sources: the training sources (files, datasets directories or hub names), each with its field, weight
        and token budget (see ``Source``), e.g. ``[{files: [stories.txt]}]``.
    train_files, dataset, dataset_config, dataset_split: the old single-corpus keys, refused with the
        equivalent ``sources`` entry in the error.
    val_files: held-out files; when absent the tail ``val_fraction`` of the training tokens is held out.
    text_field: the text column of ``val_files`` rows (JSON lines / Parquet / datasets).
    txt_separator: splits ``.txt`` ``val_files`` into documents; ``None`` = one document per file.
    tokenizer: tokenizer directory or name; default the model's ``init_from`` directory, else a new BPE.
    block_size: tokens per training sequence (at most the model's ``max_seq_len``).
    batch_size: sequences per step on each device (``val_batch_size`` for validation, default the same).
    val_fraction: share of the training tokens held out when there are no ``val_files``.
    add_bos: put BOS at the start of every text document; ``None`` = the checkpoint's convention (BOS
        when its tokenizer adds one itself).
    eos_token: the token between documents; default the tokenizer's EOS, else the generation config's.
    document_masking: give the model each block's ``document_ids`` so that no token attends across a
        document boundary and positions restart per document; ``False`` packs without masks (GPT-2 style).
    seed: seed of the data order (the same on every rank).
    num_workers: DataLoader worker processes.
    num_proc: processes that tokenize during preparation (default: the available cores, at most 8).
    streaming: tokenize and pack on the fly in the DataLoader workers instead of preparing a cache
        (hub sources, corpora too large to prepare); validation then needs ``val_files``.
    cache_dir: where tokenized corpora and trained tokenizers are kept.
    bpe_training_chars: characters of training text a new BPE is fitted on (its start).
    """

    def __init__(
        self,
        sources: list[Source] | None = None,
        train_files: list[str] | None = None,
        val_files: list[str] | None = None,
        dataset: str | None = None,
        dataset_config: str | None = None,
        dataset_split: str | None = None,
        text_field: str = "text",
        txt_separator: str | None = None,
        tokenizer: str | None = None,
        block_size: int = 256,
        batch_size: int = 16,
        val_batch_size: int | None = None,
        val_fraction: float = 0.05,
        add_bos: bool | None = None,
        eos_token: str | None = None,
        document_masking: bool = True,
        seed: int = 0,
        num_workers: int = 0,
        num_proc: int | None = None,
        streaming: bool = False,
        cache_dir: str = ".cache/kvforge",
        bpe_training_chars: int = 50_000_000,
    ) -> None:
        super().__init__()
        if train_files or dataset:
            raise ValueError(
                _old_keys_message(train_files, dataset, dataset_config, dataset_split, text_field)
            )
        if dataset_config is not None or dataset_split is not None:
            raise ValueError(
                "data.dataset_config / data.dataset_split are options of each source now: "
                "sources: [{hub: ..., hub_config: ..., split: ...}] (split also picks a saved DatasetDict's)"
            )
        if not sources:
            raise ValueError("data.sources: give at least one source, e.g. sources: [{files: [stories.txt]}]")
        for name, value in (("block_size", block_size), ("batch_size", batch_size)):
            if value <= 0:
                raise ValueError(f"data.{name}={value}: must be positive")
        if not 0 <= val_fraction < 1:
            raise ValueError(f"data.val_fraction={val_fraction}: must be in [0, 1)")
        if streaming and val_fraction > 0 and not val_files:
            raise ValueError(
                f"data.streaming=True with data.val_fraction={val_fraction}: a stream has no tail to hold out; "
                "set data.val_fraction: 0, or give data.val_files"
            )
        if num_proc is not None and num_proc < 1:
            raise ValueError(f"data.num_proc={num_proc}: must be >= 1, or null for the available cores")
        self.sources = resolve_sources(list(sources))
        self.val_source = None
        if val_files:
            val_source = Source(files=list(val_files), text_field=text_field, txt_separator=txt_separator)
            self.val_source = val_source.validate("val_files", files_field="val_files")
        self.tokenizer_name = tokenizer
        self.block_size, self.batch_size = block_size, batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.val_fraction, self.add_bos, self.eos_token, self.seed = val_fraction, add_bos, eos_token, seed
        self.document_masking = document_masking
        self.num_workers, self.streaming = num_workers, streaming
        self.num_proc = num_proc or min(8, len(os.sched_getaffinity(0)))
        self.cache_dir = Path(cache_dir)
        self.bpe_training_chars = bpe_training_chars
        self.tokenizer = None
        self.tokenizer_dir: Path | None = None
        self.train_set: PackedBlocks | None = None
        self.val_set: PackedBlocks | None = None
        self.conventions = None
        self.position = DataPosition()
        self.stream_state: dict = {}  # streaming: {"batches": consumed batches, "shards": {shard: cursor}}
        self._world, self._pass_steps = 1, 0
        self._fingerprints: dict[str, str] = {}

    # ------------------------------------------------------------------ Lightning hooks
    def prepare_data(self) -> None:
        self.build(*self._model_requirements(), create=True)

    def setup(self, stage: str | None = None) -> None:
        self.position = DataPosition()  # a new fit starts at the beginning; a resume restores it after this
        self.stream_state = {}
        if self.train_set is None:
            self.build(*self._model_requirements(), create=False)

    def train_dataloader(self) -> DataLoader:
        assert self.train_set is not None, "call setup() first"
        shard = {"num_replicas": 1, "rank": 0}
        if self.trainer is not None:
            shard = getattr(self.trainer.strategy, "distributed_sampler_kwargs", None) or shard
        if self.streaming:
            return self._streaming_loader(shard["rank"], shard["num_replicas"])
        if len(self.train_set) < self.batch_size * shard["num_replicas"]:
            raise ValueError(
                f"data: {len(self.train_set)} training blocks of {self.block_size} tokens cannot fill one batch of "
                f"{self.batch_size} on each of {shard['num_replicas']} devices; lower data.batch_size or "
                "data.block_size, or add text"
            )
        sampler = ResumableSampler(self.train_set, self.position, seed=self.seed, **shard)
        self._world, self._pass_steps = shard["num_replicas"], len(sampler) // self.batch_size
        return self._loader(self.train_set, self.batch_size, sampler=sampler, drop_last=True)

    def val_dataloader(self) -> DataLoader | list:
        assert self.val_set is not None, "call setup() first"
        if len(self.val_set) == 0:  # val_fraction 0 and no val_files: no validation
            return []
        return self._loader(self.val_set, self.val_batch_size, shuffle=False)

    def _streaming_loader(self, rank: int, world: int) -> DataLoader:
        state = self.stream_state or {"batches": 0, "shards": {}, "world": world, "workers": self.num_workers}
        if (state["world"], state["workers"]) != (world, self.num_workers):
            raise ValueError(
                f"data: the checkpoint's stream was read by {state['world']} device(s) × {state['workers']} "
                f"DataLoader workers; resuming it exactly needs the same (now {world} × {self.num_workers})"
            )
        self.stream_state = state
        self.train_set.rank, self.train_set.world = rank, world
        self.train_set.resume = {int(k): v for k, v in state["shards"].items()}
        self.train_set.batches_consumed = state["batches"]
        return self._loader(self.train_set, self.batch_size)

    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        cursor = batch.pop("stream_state", None)
        if cursor is not None and self.trainer is not None and self.trainer.training:
            # The shard's cursor after the last block of this batch: where it resumes (see ``streaming``).
            self.stream_state["shards"][int(cursor[-1, 0])] = cursor[-1].tolist()
            self.stream_state["batches"] += 1
        # Blocks that each hold one document need no mask: plain causal attention is the same and faster.
        if not self.document_masking or not batch["document_ids"].any():
            batch = {key: value for key, value in batch.items() if key != "document_ids"}
        # Called once per batch a training step consumes (Lightning's fetcher reads one batch ahead, so
        # counting batches *fetched* would overcount).
        if self.trainer is not None and self.trainer.training and self._pass_steps:
            position = self.position
            position.samples_consumed += self.batch_size * self._world
            if position.samples_consumed >= self._pass_steps * self.batch_size * self._world:
                position.epoch, position.samples_consumed = position.epoch + 1, 0
        return batch

    def state_dict(self) -> dict:
        if self.streaming:
            return {"stream": _gather_streams(self.stream_state)} if self.stream_state else {}
        return dataclasses.asdict(self.position) if self._pass_steps else {}

    def load_state_dict(self, state_dict: dict) -> None:
        if "stream" in state_dict:
            rank = self.trainer.global_rank if self.trainer is not None else 0
            self.stream_state = state_dict["stream"][rank]
        elif state_dict:
            self.position = DataPosition(**state_dict)

    # ------------------------------------------------------------------ building
    def check(self, vocab_size: int, max_seq_len: int, tokenizer_source: str | None) -> None:
        """Cheap checks against the model, run before any process is launched or any text is read."""
        if self.block_size > max_seq_len:
            raise ValueError(
                f"data.block_size={self.block_size} exceeds the model's max_seq_len={max_seq_len} "
                "(its position range); lower data.block_size"
            )
        source = self._tokenizer_source(tokenizer_source)
        if source is not None:
            self._check_vocab(load_tokenizer(source), vocab_size, source)

    def build(self, config, tokenizer_source: str | None, *, create: bool = True) -> None:
        """Load (``create``: first build) the tokenizer and the token caches, then cut the blocks."""
        self.check(config.vocab_size, config.max_seq_len, tokenizer_source)
        self.tokenizer, self.tokenizer_dir = self._resolve_tokenizer(
            tokenizer_source, config.vocab_size, create
        )
        self.conventions = resolve_conventions(
            self.tokenizer, self.tokenizer_dir, self.add_bos, self.eos_token
        )
        if self.streaming:
            self._build_streaming(create)
            return
        trains, vals = [], []
        for source in self.sources:
            stream = self._stream(source, create)
            split = len(stream) if self.val_source else int(len(stream) * (1 - self.val_fraction))
            trains.append(PackedBlocks(stream, 0, split, self.block_size))
            vals.append(PackedBlocks(stream, split, len(stream), self.block_size))
            if len(trains[-1]) == 0:
                raise ValueError(
                    f"data.{source.name}: {split} tokens make no training block of {self.block_size} + 1 tokens"
                )
        if self.val_source:
            val = self._stream(self.val_source, create)
            vals = [PackedBlocks(val, 0, len(val), self.block_size)]
        weights = [source.weight for source in self.sources]
        self.train_set = trains[0] if len(trains) == 1 else MixtureBlocks(trains, weights)
        self.val_set = vals[0] if len(vals) == 1 else MixtureBlocks(vals, [1.0] * len(vals))
        if (self.val_fraction > 0 or self.val_source) and len(self.val_set) == 0:
            raise ValueError(
                f"data: the validation text has too few tokens for one block of {self.block_size} + 1; "
                "raise data.val_fraction or give longer val_files"
            )

    def _build_streaming(self, create: bool) -> None:
        self.train_set = StreamingBlocks(
            self.sources, self.tokenizer, self.conventions, self.block_size, self.seed
        )
        self.val_set = []
        if self.val_source:
            val = self._stream(self.val_source, create)
            self.val_set = PackedBlocks(val, 0, len(val), self.block_size)

    def val_tokens(self) -> torch.Tensor:
        """The held-out token stream as one 1-D tensor (for windowed perplexity)."""
        assert self.val_set is not None, "call setup() first"
        parts = self.val_set.parts if isinstance(self.val_set, MixtureBlocks) else [self.val_set]
        return torch.from_numpy(
            np.concatenate([p.stream.tokens[p.start : p.end] for p in parts]).astype("int64")
        )

    # ------------------------------------------------------------------ helpers
    def _model_requirements(self) -> tuple:
        module = self.trainer.lightning_module
        return module.data_config(), module.tokenizer_source

    def _tokenizer_source(self, model_dir: str | None) -> str | None:
        if self.tokenizer_name is not None:
            return self.tokenizer_name
        if model_dir is not None and has_tokenizer(model_dir):
            return model_dir
        return None

    @staticmethod
    def _check_vocab(tokenizer, vocab_size: int, source) -> None:
        if len(tokenizer) > vocab_size:
            raise ValueError(
                f"tokenizer {source} has {len(tokenizer)} tokens but the model's vocab_size is {vocab_size}: "
                "token ids would index past the embedding; use the model's own tokenizer"
            )

    def _resolve_tokenizer(self, model_dir: str | None, vocab_size: int, create: bool):
        source = self._tokenizer_source(model_dir)
        if source is not None:
            tokenizer = load_tokenizer(source)
            if Path(source).is_dir():
                return tokenizer, Path(source)
            local = self.cache_dir / "tokenizers" / cache_key(tokenizer=tokenizer_fingerprint(tokenizer))
            if create and not local.exists():
                with atomic_directory(local, overwrite=True) as tmp:  # a kill mid-save leaves no half entry
                    tokenizer.save_pretrained(tmp)
            return tokenizer, local
        data = [self._fingerprint(source) for source in self.sources]
        key = cache_key(kind="bpe", data=data, vocab=vocab_size, chars=self.bpe_training_chars)
        directory = self.cache_dir / "tokenizers" / key
        if not has_tokenizer(directory):
            if not create:
                raise FileNotFoundError(f"no trained tokenizer in {directory}: run prepare_data() first")
            train_byte_bpe(self._bpe_texts(), vocab_size, directory)
        return load_tokenizer(directory), directory

    def _bpe_texts(self):
        budget = self.bpe_training_chars
        for source in self.sources:
            for piece in source_pieces(source):
                if budget <= 0:
                    return
                text = piece.text or "\n".join(m["content"] for m in piece.messages or ())
                yield text[:budget]
                budget -= len(text)

    def _fingerprint(self, source: Source) -> str:
        if source.name not in self._fingerprints:
            self._fingerprints[source.name] = source.fingerprint()
        return self._fingerprints[source.name]

    def _stream(self, source: Source, create: bool):
        return prepare_stream(
            source,
            self.tokenizer,
            tokenizer_fingerprint=tokenizer_fingerprint(self.tokenizer),
            conventions=self.conventions,
            cache_dir=self.cache_dir,
            create=create,
            num_proc=self.num_proc,
            fingerprint=self._fingerprint(source),
        )

    def _loader(self, dataset: PackedBlocks, batch_size: int, **options) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=batch_size,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
            **options,
        )


def _gather_streams(state: dict) -> list[dict]:
    """Every rank's stream state, indexed by rank (Lightning saves the datamodule's state from rank 0 only,
    and each rank reads its own shards)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [state]
    states: list = [None] * dist.get_world_size()
    dist.all_gather_object(states, state)
    return states


def _old_keys_message(train_files, dataset, dataset_config, dataset_split, text_field) -> str:
    """The error for ``train_files`` / ``dataset``: the ``sources`` entry that says the same."""
    entry = {"files": list(train_files)} if train_files else {"hub": dataset}
    if dataset and dataset_config:
        entry["hub_config"] = dataset_config
    if dataset_split not in (None, "train"):
        entry["split"] = dataset_split
    if text_field != "text":
        entry["text_field"] = text_field
    old = "train_files" if train_files else "dataset"
    written = ", ".join(f"{key}: {json.dumps(value)}" for key, value in entry.items())
    return f"data.{old} is replaced by data.sources; write instead:\n  sources: [{{{written}}}]"
