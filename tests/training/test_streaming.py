"""Streaming mode: blocks tokenized on the fly, sharded over ranks × workers with no duplicate and no gap,
the first batch after O(batch) work, and an exact resume mid-stream and mid-mixture."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from kvforge.training.data import TextDataModule
from kvforge.training.data.streaming import StreamingBlocks
from tests.conftest import shared_path
from tests.training.helpers import CHAT, LossRecorder, chat_tokenizer, tiny_config, tiny_module, trainer

BLOCK = 16


@pytest.fixture
def tokenizer_dir():
    return str(shared_path("stories260K"))


def _jsonl(path, prefix, n, words=12, tail=""):
    rows = [
        json.dumps({"text": f"{prefix} {i}: " + " ".join(f"w{i}x{j}" for j in range(words))})
        for i in range(n)
    ]
    path.write_text("\n".join(rows) + "\n" + tail)
    return str(path)


def _streaming(tmp_path, tokenizer_dir, sources, **options):
    settings = dict(
        tokenizer=tokenizer_dir,
        block_size=BLOCK,
        batch_size=2,
        val_fraction=0.0,
        streaming=True,
        cache_dir=str(tmp_path / "cache"),
    )
    settings.update(options)
    data = TextDataModule(sources=sources, **settings)
    data.build(tiny_config(vocab_size=512), None, create=True)
    return data


def test_two_ranks_times_two_workers_read_every_document_once(tmp_path, tokenizer_dir):
    corpus = _jsonl(tmp_path / "a.jsonl", "doc", 37)
    data = _streaming(tmp_path, tokenizer_dir, [{"files": [corpus]}])
    stream: StreamingBlocks = data.train_set
    tokenizer, conventions = data.tokenizer, data.conventions
    rows = [json.loads(line)["text"] for line in (tmp_path / "a.jsonl").read_text().splitlines()]
    seen = []
    for rank in range(2):
        for worker in range(2):
            shard = rank * 2 + worker  # what StreamingBlocks.__iter__ picks in worker `worker` of rank `rank`
            mine = list(range(shard, len(rows), 4))
            seen += mine
            expected = []
            for index in mine:
                ids = tokenizer(rows[index], add_special_tokens=False)["input_ids"]
                expected += [conventions.bos_id, *ids, conventions.eos_id]
            emitted: list[int] = []
            for block in stream.shard_blocks(shard, 4):
                ids = block["input_ids"].tolist() + block["targets"][-1:].tolist()
                emitted += ids if not emitted else ids[1:]
                if block["stream_state"][2].item() == 1:  # the buffer starts in the second pass
                    break
            assert emitted[: len(expected)] == expected, f"shard {shard}"
    assert sorted(seen) == list(range(len(rows)))


def test_streaming_reads_only_what_the_first_blocks_need(tmp_path, tokenizer_dir):
    """A corpus whose end is broken: prepared mode fails on it, streaming gives its first batches."""
    corpus = _jsonl(tmp_path / "a.jsonl", "doc", 3000, tail="not json\n")
    data = _streaming(tmp_path, tokenizer_dir, [{"files": [corpus]}])
    loader = data.train_dataloader()
    batch = next(iter(loader))
    assert batch["input_ids"].shape == (2, BLOCK)
    with pytest.raises(ValueError, match=r"a\.jsonl:3001: not a JSON object per line"):
        _streaming(tmp_path, tokenizer_dir, [{"files": [corpus]}], streaming=False)


def test_hub_path_streams_local_parquet_like_the_files(tmp_path, tokenizer_dir):
    import pyarrow as pa
    import pyarrow.parquet as pq

    corpus = _jsonl(tmp_path / "a.jsonl", "doc", 40)
    texts = [json.loads(line)["text"] for line in (tmp_path / "a.jsonl").read_text().splitlines()]
    pq.write_table(pa.table({"text": texts}), tmp_path / "a.parquet")
    hub = _streaming(
        tmp_path, tokenizer_dir, [{"hub": "parquet", "data_files": [str(tmp_path / "a.parquet")]}]
    )
    files = _streaming(tmp_path, tokenizer_dir, [{"files": [corpus]}])
    for got, want in zip(hub.train_set.shard_blocks(1, 2), files.train_set.shard_blocks(1, 2)):
        assert torch.equal(got["input_ids"], want["input_ids"])
        if got["stream_state"][2] == 1:
            break


def test_cursor_state_restarts_the_same_blocks(tmp_path, tokenizer_dir):
    corpus = _jsonl(tmp_path / "a.jsonl", "doc", 20)
    stream = _streaming(tmp_path, tokenizer_dir, [{"files": [corpus]}]).train_set
    blocks = stream.shard_blocks(0, 1)
    seen = [next(blocks) for _ in range(12)]
    stream.resume = {0: seen[4]["stream_state"].tolist()}
    again = stream.shard_blocks(0, 1)
    for block in seen[5:]:
        assert torch.equal(next(again)["input_ids"], block["input_ids"])


def _fit(tmp_path, sources, max_steps, ckpt_path=None, callbacks=()):
    torch.manual_seed(7)
    recorder = LossRecorder()
    data = TextDataModule(
        sources=sources,
        tokenizer=str(shared_path("stories260K")),
        block_size=32,
        batch_size=2,
        val_fraction=0.0,
        streaming=True,
        num_workers=2,
        cache_dir=str(tmp_path / "cache"),
    )
    run = trainer(tmp_path / "run", max_steps, callbacks=[recorder, *callbacks])
    module = tiny_module(steps=9, model=tiny_config(vocab_size=512))
    run.fit(module, datamodule=data, ckpt_path=ckpt_path)
    return recorder.losses


def test_resume_mid_stream_and_mid_mixture_matches_the_uninterrupted_run(tmp_path):
    sources = [
        {"files": [_jsonl(tmp_path / "a.jsonl", "alpha", 60)], "weight": 2},
        {"files": [_jsonl(tmp_path / "b.jsonl", "beta", 60, words=40)], "weight": 1},
    ]
    uninterrupted = _fit(tmp_path / "full", sources, 9)
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_train_steps=1000)
    first = _fit(tmp_path / "part", sources, 5, callbacks=[checkpoints])  # odd: a worker is mid-turn
    resumed = _fit(tmp_path / "part", sources, 9, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert sorted(resumed) == list(range(6, 10))
    got = [first[s] if s <= 5 else resumed[s] for s in range(1, 10)]
    assert np.allclose(got, [uninterrupted[s] for s in range(1, 10)], atol=1e-5, rtol=0)


def test_each_worker_of_each_rank_reads_its_own_shard_in_turn(tmp_path, tokenizer_dir):
    from torch.utils.data import DataLoader

    corpus = _jsonl(tmp_path / "a.jsonl", "doc", 40)
    stream = _streaming(tmp_path, tokenizer_dir, [{"files": [corpus]}]).train_set
    stream.world = 2
    for rank, rotation in ((0, 0), (1, 1)):
        stream.rank, stream.batches_consumed = rank, rotation  # a resume rotates the workers' shards
        loader = iter(DataLoader(stream, batch_size=2, num_workers=2))
        shards = [next(loader)["stream_state"][:, 0].tolist() for _ in range(4)]
        first, second = 2 * rank + rotation, 2 * rank + 1 - rotation
        assert shards == [[first] * 2, [second] * 2, [first] * 2, [second] * 2]


def _gather_on_rank(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    from kvforge.training.data.datamodule import _gather_streams

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        gathered = _gather_streams({"batches": 3, "shards": {2 * rank: [2 * rank, 5, 0, rank, 7]}})
        with open(f"{out}/rank{rank}.json", "w") as handle:
            json.dump(gathered, handle)
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_the_checkpoint_keeps_every_ranks_stream_cursors(tmp_path):
    """Lightning writes the DataModule state of rank 0 only: the cursors of all ranks are gathered into it."""
    import multiprocessing
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    context = multiprocessing.get_context("fork")
    ranks = [context.Process(target=_gather_on_rank, args=(r, port, str(tmp_path))) for r in range(2)]
    for process in ranks:
        process.start()
    for process in ranks:
        process.join(timeout=60)
        assert process.exitcode == 0
    expected = [{"batches": 3, "shards": {str(2 * r): [2 * r, 5, 0, r, 7]}} for r in range(2)]
    for rank in range(2):
        assert json.loads((tmp_path / f"rank{rank}.json").read_text()) == expected
    data = TextDataModule(
        sources=[{"files": [_jsonl(tmp_path / "a.jsonl", "d", 2)]}], streaming=True, val_fraction=0
    )
    data.load_state_dict({"stream": expected})  # outside a Trainer: rank 0's
    assert data.stream_state == expected[0]


def test_streamed_chat_blocks_score_only_the_answers(tmp_path):
    from kvforge.kernels.cross_entropy import IGNORE_INDEX
    from kvforge.training.data.chat import encode_chat

    directory = chat_tokenizer(tmp_path / "tokenizer")
    corpus = tmp_path / "chat.jsonl"
    corpus.write_text(json.dumps({"messages": CHAT}) + "\n")
    source = {"files": [str(corpus)], "messages_field": "messages"}
    data = _streaming(tmp_path, directory, [source], block_size=48)
    ids, mask = encode_chat(data.tokenizer, CHAT)
    ids, mask = [*ids, data.conventions.eos_id], [*mask, mask[-1]]  # [tokens] EOS, no BOS for chat
    block = next(data.train_set.shard_blocks(0, 1))
    expected = [t if m else IGNORE_INDEX for t, m in zip(ids[1:49], mask[1:49])]
    assert block["input_ids"].tolist() == ids[:48]
    assert block["targets"].tolist() == expected
    assert 0 < expected.count(IGNORE_INDEX) < 48  # the block holds prompt and answer tokens


def test_a_token_budget_is_shared_by_the_streams_and_resumes_exactly(tmp_path, tokenizer_dir):
    corpus = _jsonl(tmp_path / "a.jsonl", "doc", 30)
    whole = _streaming(tmp_path, tokenizer_dir, [{"files": [corpus]}]).train_set
    capped = _streaming(tmp_path, tokenizer_dir, [{"files": [corpus], "max_tokens": 200}]).train_set

    def tokens(blocks, n):
        emitted: list[int] = []
        for block, _ in zip(blocks, range(n)):
            ids = block["input_ids"].tolist() + block["targets"][-1:].tolist()
            emitted += ids if not emitted else ids[1:]
        return emitted

    reference = tokens(whole.shard_blocks(1, 2), 10)[:100]  # shard 1 of 2 reads 100 tokens per pass
    assert tokens(capped.shard_blocks(1, 2), 20)[:300] == reference * 3
    seen = [block for block, _ in zip(capped.shard_blocks(1, 2), range(20))]
    capped.resume = {1: seen[8]["stream_state"].tolist()}  # the cursor mid-way through the second pass
    for block, again in zip(seen[9:], capped.shard_blocks(1, 2)):
        assert torch.equal(block["input_ids"], again["input_ids"])
