"""TextDataModule: documents, EOS packing, blocks, the token cache, validation split and the sampler."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from kvforge.training.data import PackedBlocks, TextDataModule, documents, token_cache
from kvforge.training.data.blocks import DataPosition, ResumableSampler
from tests.conftest import shared_path
from tests.training.helpers import tiny_config

DOCS = ["Once upon a time there was a cat.", "The dog ran home.\n\nIt was late.", "Lily smiled."]


@pytest.fixture
def tokenizer_dir():
    return str(shared_path("stories260K"))


def _module(tmp_path, files, tokenizer_dir, **options):
    settings = dict(
        tokenizer=tokenizer_dir,
        block_size=8,
        batch_size=2,
        val_fraction=0.0,
        add_bos=False,  # the streams below are checked token by token (BOS conventions: test_sources.py)
        cache_dir=str(tmp_path / "cache"),
    )
    source = {"files": [str(f) for f in files]}
    if "txt_separator" in options:  # an option of the source
        source["txt_separator"] = options.pop("txt_separator")
    settings.update(options)
    data = TextDataModule(sources=[source], **settings)
    data.build(tiny_config(vocab_size=512), None)
    return data


def _stream(data):
    return np.asarray(data.train_set.stream.tokens).tolist()


def _jsonl(tmp_path, docs=DOCS):
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return path


def test_packing_puts_eos_between_documents(tmp_path, tokenizer_dir):
    data = _module(tmp_path, [_jsonl(tmp_path)], tokenizer_dir)
    encode = lambda text: data.tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    eos = data.tokenizer.eos_token_id
    expected = [*encode(DOCS[0]), eos, *encode(DOCS[1]), eos, *encode(DOCS[2])]
    assert _stream(data) == expected
    starts = [0, len(encode(DOCS[0])) + 1, len(encode(DOCS[0])) + len(encode(DOCS[1])) + 2]
    assert data.train_set.stream.doc_starts.tolist() == starts


def test_blocks_cover_the_stream_except_the_final_partial_block(tmp_path, tokenizer_dir):
    data = _module(tmp_path, [_jsonl(tmp_path)], tokenizer_dir, block_size=5)
    stream, blocks = _stream(data), data.train_set
    assert len(blocks) == (len(stream) - 1) // 5
    inputs = torch.cat([blocks[i]["input_ids"] for i in range(len(blocks))]).tolist()
    assert [*inputs, blocks[len(blocks) - 1]["targets"][-1].item()] == stream[: len(inputs) + 1]
    for i in range(len(blocks)):
        assert torch.equal(blocks[i]["targets"][:-1], blocks[i]["input_ids"][1:])
    assert len(stream) - (len(inputs) + 1) < 5 + 1  # only the final partial block is dropped


def test_document_ids_number_documents_within_each_block(tmp_path, tokenizer_dir):
    data = _module(tmp_path, [_jsonl(tmp_path)], tokenizer_dir, block_size=4)
    starts = data.train_set.stream.doc_starts.tolist()
    for i in range(len(data.train_set)):
        positions = range(i * 4, i * 4 + 4)
        absolute = [sum(p >= s for s in starts) - 1 for p in positions]
        expected = [a - absolute[0] for a in absolute]
        assert data.train_set[i]["document_ids"].tolist() == expected
    assert any(data.train_set[i]["document_ids"].max() > 0 for i in range(len(data.train_set)))


def test_a_txt_file_is_one_document_unless_a_separator_is_given(tmp_path, tokenizer_dir):
    path = tmp_path / "stories.txt"
    path.write_text("<|doc|>".join(DOCS))
    whole = _module(tmp_path, [path], tokenizer_dir)
    split = _module(tmp_path, [path], tokenizer_dir, txt_separator="<|doc|>")
    eos = whole.tokenizer.eos_token_id
    assert eos not in _stream(whole)
    assert _stream(split).count(eos) == 2
    assert split.train_set.stream.doc_starts.tolist()[0] == 0


def test_jsonl_parquet_and_dataset_directory_give_the_same_stream(tmp_path, tokenizer_dir):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": DOCS, "id": [1, 2, 3]}), tmp_path / "docs.parquet")
    datasets.Dataset.from_dict({"text": DOCS}).save_to_disk(str(tmp_path / "saved"))
    streams = [
        _stream(_module(tmp_path, [p], tokenizer_dir))
        for p in (_jsonl(tmp_path), tmp_path / "docs.parquet", tmp_path / "saved")
    ]
    assert streams[0] == streams[1] == streams[2]


def test_long_text_is_read_in_pieces_cut_at_line_ends(tmp_path, monkeypatch):
    text = "".join(f"line {i} of a long story.\n" for i in range(200)) + "the end"
    path = tmp_path / "long.txt"
    path.write_text(text)
    monkeypatch.setattr(documents, "TEXT_PIECE_CHARS", 300)
    pieces = list(documents.iter_pieces([path]))
    assert len(pieces) > 5
    assert "".join(p.text for p in pieces) == text
    assert all(p.text.endswith("\n") and not p.ends_document for p in pieces[:-1])
    assert pieces[-1].ends_document


def test_the_tokenized_cache_is_reused(tmp_path, tokenizer_dir, monkeypatch):
    corpus = _jsonl(tmp_path)
    first = _module(tmp_path, [corpus], tokenizer_dir)
    entry = first.train_set.stream.directory
    written = (entry / "tokens.bin").stat().st_mtime_ns

    def fail(*args, **kwargs):
        raise AssertionError("the corpus was tokenized again")

    monkeypatch.setattr(token_cache, "tokenize_to_cache", fail)
    monkeypatch.setattr("kvforge.training.data.prepare.tokenize_to_cache", fail)
    second = _module(tmp_path, [corpus], tokenizer_dir)
    assert second.train_set.stream.directory == entry
    assert (entry / "tokens.bin").stat().st_mtime_ns == written
    assert _stream(second) == _stream(first)


def test_changed_text_gets_a_new_cache_entry(tmp_path, tokenizer_dir):
    corpus = _jsonl(tmp_path)
    first = _module(tmp_path, [corpus], tokenizer_dir).train_set.stream.directory
    corpus.write_text(corpus.read_text() + json.dumps({"text": "One more."}) + "\n")
    second = _module(tmp_path, [corpus], tokenizer_dir).train_set.stream.directory
    assert first != second


def test_validation_is_the_tail_of_the_token_stream(tmp_path, tokenizer_dir):
    path = shared_path("corpora", "botchan.txt")
    data = _module(tmp_path, [path], tokenizer_dir, val_fraction=0.25, block_size=64)
    n_tokens = len(data.train_set.stream)
    split = int(n_tokens * 0.75)
    assert data.train_set.end == split and data.val_set.start == split
    assert torch.equal(
        data.val_tokens(), torch.from_numpy(data.train_set.stream.tokens[split:].astype(np.int64))
    )


def test_without_a_tokenizer_a_byte_level_bpe_is_trained_and_reproducible(tmp_path):
    corpus = _jsonl(tmp_path, DOCS * 20)
    runs = []
    for name in ("a", "b"):
        data = TextDataModule(
            sources=[{"files": [str(corpus)]}],
            block_size=8,
            batch_size=1,
            val_fraction=0.0,
            cache_dir=str(tmp_path / name),
        )
        data.build(tiny_config(), None)
        runs.append(data)
    assert len(runs[0].tokenizer) <= tiny_config().vocab_size
    assert runs[0].tokenizer.eos_token == "<|endoftext|>"
    assert (runs[0].tokenizer_dir / "tokenizer.json").read_text() == (
        runs[1].tokenizer_dir / "tokenizer.json"
    ).read_text()
    assert runs[0].tokenizer.decode(runs[0].tokenizer(DOCS[1])["input_ids"]) == DOCS[1]


def _blocks(n):
    stream = token_cache.TokenStream(np.arange(n * 4 + 1, dtype=np.uint16), np.zeros(1, dtype=np.int64), None)
    return PackedBlocks(stream, 0, n * 4 + 1, 4)


def test_sampler_shards_are_disjoint_and_cover_the_pass():
    blocks, position = _blocks(10), DataPosition()
    shards = [list(ResumableSampler(blocks, position, num_replicas=2, rank=r, seed=3)) for r in range(2)]
    assert not set(shards[0]) & set(shards[1])
    assert sorted(shards[0] + shards[1]) == list(range(10))


def test_sampler_starts_at_the_data_position():
    blocks = _blocks(10)
    full = list(ResumableSampler(blocks, DataPosition(epoch=2), num_replicas=1, rank=0, seed=3))
    resumed = list(
        ResumableSampler(blocks, DataPosition(epoch=2, samples_consumed=4), num_replicas=1, rank=0, seed=3)
    )
    assert resumed == full[4:]
    next_pass = list(ResumableSampler(blocks, DataPosition(epoch=3), num_replicas=1, rank=0, seed=3))
    assert next_pass != full and sorted(next_pass) == sorted(full)


def test_hub_dataset_offline_fails_with_a_clear_error(tmp_path, tokenizer_dir, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    data = TextDataModule(
        sources=[{"hub": "no-such-user/no-such-dataset"}],
        tokenizer=tokenizer_dir,
        block_size=8,
        cache_dir=str(tmp_path),
    )
    with pytest.raises(
        ValueError, match=r"data\.sources\[0\]\.hub='no-such-user/no-such-dataset': could not load it"
    ):
        data.build(tiny_config(vocab_size=512), None)
