"""data.sources: mixtures by weight, token budgets, the checkpoint's BOS/EOS, chat masks, parallel
tokenization, the cheap cache fingerprint, the hub path, and the errors for bad sources."""

from __future__ import annotations

import json

import numpy as np
import pytest

from kvforge.conversion.loading import load_tokenizer
from kvforge.kernels.cross_entropy import IGNORE_INDEX
from kvforge.training.data import TextDataModule, encode, prepare
from kvforge.training.data.blocks import DataPosition, ResumableSampler
from kvforge.training.data.chat import encode_chat
from tests.conftest import shared_path
from tests.training.helpers import CHAT, chat_tokenizer, tiny_config


@pytest.fixture
def tokenizer_dir():
    return str(shared_path("stories260K"))


@pytest.fixture
def chat_tokenizer_dir(tmp_path):
    return chat_tokenizer(tmp_path / "chat_tokenizer")


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def _texts(prefix, n, words=30):
    return [{"text": f"{prefix} story {i}: " + " ".join(f"w{i}x{j}" for j in range(words))} for i in range(n)]


def _data(tmp_path, tokenizer, sources=None, **options):
    settings = dict(
        tokenizer=tokenizer, block_size=16, batch_size=2, val_fraction=0.0, cache_dir=str(tmp_path / "c")
    )
    settings.update(options)
    data = TextDataModule(sources=sources, **settings)
    data.build(tiny_config(vocab_size=512), None)
    return data


def test_the_old_single_corpus_keys_print_the_equivalent_source(tmp_path, tokenizer_dir):
    corpus = _jsonl(tmp_path / "a.jsonl", _texts("a", 5))
    with pytest.raises(
        ValueError,
        match=r'(?s)data\.train_files is replaced by data\.sources.*sources: \[\{files: \[".*text_field: "story"\}\]',
    ):
        TextDataModule(train_files=[corpus], text_field="story", tokenizer=tokenizer_dir)
    with pytest.raises(ValueError, match=r'sources: \[\{hub: "user/stories", hub_config: "en"\}\]'):
        TextDataModule(dataset="user/stories", dataset_config="en", tokenizer=tokenizer_dir)


def test_mixture_proportions_follow_the_weights(tmp_path, tokenizer_dir):
    """Weights 3 : 1 over sources of very different sizes: the share of blocks drawn from the first source
    is 0.75 within 0.02 over one pass of ~2,400 samples (binomial std ≈ 0.009)."""
    big = _jsonl(tmp_path / "big.jsonl", _texts("big", 200))
    small = _jsonl(tmp_path / "small.jsonl", _texts("small", 20))
    data = _data(tmp_path, tokenizer_dir, [{"files": [small], "weight": 3}, {"files": [big], "weight": 1}])
    mixture = data.train_set
    n_small = len(mixture.parts[0])
    assert n_small < len(mixture) / 5  # the small source is drawn far more often than its size says
    order = np.asarray(mixture.pass_order(seed=0, epoch=0))
    share = (order < n_small).mean()
    assert abs(share - 0.75) < 0.02, share
    assert len(order) == len(mixture) and order.max() < len(mixture)


def test_mixture_is_resumed_exactly_by_the_data_position(tmp_path, tokenizer_dir):
    a, b = _jsonl(tmp_path / "a.jsonl", _texts("a", 30)), _jsonl(tmp_path / "b.jsonl", _texts("b", 60))
    mixture = _data(tmp_path, tokenizer_dir, [{"files": [a], "weight": 2}, {"files": [b]}]).train_set
    full = [
        list(ResumableSampler(mixture, DataPosition(epoch=1), num_replicas=2, rank=r, seed=5))
        for r in range(2)
    ]
    for rank in range(2):
        resumed = ResumableSampler(
            mixture, DataPosition(epoch=1, samples_consumed=6), num_replicas=2, rank=rank, seed=5
        )
        assert list(resumed) == full[rank][3:]
    assert list(ResumableSampler(mixture, DataPosition(epoch=2), num_replicas=2, rank=0, seed=5)) != full[0]


def test_token_budget_caps_a_source(tmp_path, tokenizer_dir):
    corpus = _jsonl(tmp_path / "a.jsonl", _texts("a", 40))
    whole = _data(tmp_path, tokenizer_dir, [{"files": [corpus]}])
    capped = _data(tmp_path, tokenizer_dir, [{"files": [corpus], "max_tokens": 500}])
    assert len(capped.train_set.stream) == 500
    assert np.array_equal(capped.train_set.stream.tokens, whole.train_set.stream.tokens[:500])


def test_documents_get_the_checkpoints_bos_and_eos_by_default(tmp_path, tokenizer_dir):
    docs = _texts("a", 3, words=3)
    data = _data(tmp_path, tokenizer_dir, [{"files": [_jsonl(tmp_path / "a.jsonl", docs)]}])
    tokenizer = data.tokenizer
    expected = []
    for row in docs:
        expected += [tokenizer.bos_token_id, *tokenizer(row["text"], add_special_tokens=False)["input_ids"]]
        expected.append(tokenizer.eos_token_id)
    assert np.asarray(data.train_set.stream.tokens).tolist() == expected[:-1]  # stories260K: <s> … </s>
    no_bos = _data(tmp_path, tokenizer_dir, [{"files": [_jsonl(tmp_path / "a.jsonl", docs)]}], add_bos=False)
    assert tokenizer.bos_token_id not in np.asarray(no_bos.train_set.stream.tokens).tolist()
    separated = _data(
        tmp_path, tokenizer_dir, [{"files": [str(tmp_path / "a.jsonl")]}], add_bos=False, eos_token="<s>"
    )
    assert np.asarray(separated.train_set.stream.tokens).tolist().count(tokenizer.bos_token_id) == 2


def test_chat_mask_is_right_token_by_token(chat_tokenizer_dir):
    tokenizer = load_tokenizer(chat_tokenizer_dir)
    ids, mask = encode_chat(tokenizer, CHAT)
    pieces = tokenizer.convert_ids_to_tokens(ids)
    scored = [piece for piece, m in zip(pieces, mask) if m]
    # The answers, each with the template's end-of-turn (</s>, newline); "▁H" joins the prompt's space and
    # the answer's first letter, so the model must predict it.
    answer = ["A", "▁g", "ir", "l", ".", "</s>", "▁", "<0x0A>"]
    assert scored == [*answer, "▁H", "er", "▁do", "g", ".", "</s>", "▁", "<0x0A>"]
    assert tokenizer.decode([i for i, m in zip(ids, mask) if not m]).replace(" ", "") == (
        "[user]:WhoisLily?</s>\n[assistant]:[user]:AndTom?</s>\n[assistant]:"
    )


def test_chat_targets_outside_assistant_turns_are_ignored(tmp_path, chat_tokenizer_dir):
    rows = [{"messages": CHAT}, {"messages": CHAT[:2]}]
    data = _data(
        tmp_path,
        chat_tokenizer_dir,
        [{"files": [_jsonl(tmp_path / "chat.jsonl", rows)], "messages_field": "messages"}],
        block_size=8,
    )
    stream = data.train_set.stream
    first_ids, first_mask = encode_chat(data.tokenizer, CHAT)
    assert np.asarray(stream.tokens[: len(first_ids)]).tolist() == first_ids
    assert np.asarray(stream.loss_mask[: len(first_ids)]).tolist() == first_mask
    assert stream.loss_mask[len(first_ids)] == first_mask[-1]  # the EOS between documents follows the answer
    for index in range(len(data.train_set)):
        block = data.train_set[index]
        start = index * 8
        scored = np.asarray(stream.loss_mask[start + 1 : start + 9]) == 1
        targets = block["targets"].numpy()
        assert (targets[~scored] == IGNORE_INDEX).all()
        assert np.array_equal(targets[scored], np.asarray(stream.tokens[start + 1 : start + 9])[scored])


def test_parallel_tokenization_gives_the_same_stream(tmp_path, tokenizer_dir, monkeypatch):
    monkeypatch.setattr(encode, "BATCH_CHARS", 2_000)  # many batches, so the pool runs
    corpus = _jsonl(tmp_path / "a.jsonl", _texts("a", 120))
    one = _data(tmp_path / "1", tokenizer_dir, [{"files": [corpus]}], num_proc=1)
    two = _data(tmp_path / "2", tokenizer_dir, [{"files": [corpus]}], num_proc=2)
    assert np.array_equal(one.train_set.stream.tokens, two.train_set.stream.tokens)
    assert np.array_equal(one.train_set.stream.doc_starts, two.train_set.stream.doc_starts)


def test_the_cache_key_reads_no_corpus_bytes(tmp_path, tokenizer_dir, monkeypatch):
    corpus = _jsonl(tmp_path / "a.jsonl", _texts("a", 5))
    first = _data(tmp_path, tokenizer_dir, [{"files": [corpus]}])

    def no_reading(*args, **kwargs):
        raise AssertionError("the corpus was read again")

    monkeypatch.setattr(prepare, "source_pieces", no_reading)
    second = _data(tmp_path, tokenizer_dir, [{"files": [corpus]}])
    assert second.train_set.stream.directory == first.train_set.stream.directory
    (tmp_path / "a.jsonl").touch()  # same bytes, new mtime: a new entry (the fingerprint is not a hash)
    with pytest.raises(AssertionError, match="read again"):
        _data(tmp_path, tokenizer_dir, [{"files": [corpus]}])


def test_hub_path_streams_local_parquet(tmp_path, tokenizer_dir):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = _texts("p", 12)
    pq.write_table(pa.table({"text": [r["text"] for r in rows]}), tmp_path / "rows.parquet")
    hub = _data(tmp_path, tokenizer_dir, [{"hub": "parquet", "data_files": [str(tmp_path / "rows.parquet")]}])
    files = _data(tmp_path, tokenizer_dir, [{"files": [_jsonl(tmp_path / "rows.jsonl", rows)]}])
    assert np.array_equal(hub.train_set.stream.tokens, files.train_set.stream.tokens)


def _cache_files(tmp_path):
    cache = tmp_path / "c" / "tokens"
    return [p for p in cache.rglob("*") if p.is_file()] if cache.exists() else []


@pytest.mark.parametrize(
    ("source", "message"),
    [
        (
            {"files": ["{dir}/a.jsonl"], "text_field": "body"},
            r"data\.sources\[0\]\.text_field='body' \(the row has \['text'\]\)",
        ),
        ({"files": ["{dir}/empty.jsonl"]}, r"data\.sources\[0\]: the corpus is empty"),
        (
            {"files": ["{dir}/a.jsonl"], "weight": 0},
            r"data\.sources\[0\]\.weight=0: must be a finite number > 0",
        ),
        ({"files": ["{dir}/a.jsonl"], "name": "web", "weight": -1}, r"data\.web\.weight=-1"),
        (
            {"files": ["{dir}/roles.jsonl"], "messages_field": "messages"},
            r"roles\.jsonl:1: data\.sources\[0\]\.messages_field='messages': message 1 has unknown role 'robot'; allowed are \['system', 'user', 'assistant', 'tool'\]",
        ),
        (
            {"files": ["{dir}/a.jsonl"], "colour": "red"},
            r"data\.sources\[0\]: unknown option\(s\) \['colour'\]",
        ),
        ({"files": ["{dir}/a.jsonl"], "hub": "x/y"}, r"data\.sources\[0\]: give exactly one of files"),
    ],
)
def test_bad_sources_are_clear_errors_and_cache_nothing(tmp_path, chat_tokenizer_dir, source, message):
    _jsonl(tmp_path / "a.jsonl", _texts("a", 3))
    (tmp_path / "empty.jsonl").write_text('{"text": "  "}\n')
    _jsonl(
        tmp_path / "roles.jsonl",
        [{"messages": [{"role": "user", "content": "hi"}, {"role": "robot", "content": "beep"}]}],
    )
    source = {
        k: [v.format(dir=tmp_path) for v in value] if k == "files" else value for k, value in source.items()
    }
    with pytest.raises(ValueError, match=message):
        _data(tmp_path, chat_tokenizer_dir, [source])
    assert _cache_files(tmp_path) == []


def test_a_corpus_that_changes_while_prepared_is_an_error_and_caches_nothing(
    tmp_path, tokenizer_dir, monkeypatch
):
    corpus = tmp_path / "a.jsonl"
    _jsonl(corpus, _texts("a", 5))
    reader = prepare.source_pieces

    def appending_reader(source, **options):
        for number, piece in enumerate(reader(source, **options)):
            if number == 1:
                with open(corpus, "a") as handle:
                    handle.write(json.dumps({"text": "written meanwhile"}) + "\n")
            yield piece

    monkeypatch.setattr(prepare, "source_pieces", appending_reader)
    with pytest.raises(
        ValueError, match=r"data\.sources\[0\]: the corpus changed while it was being prepared"
    ):
        _data(tmp_path, tokenizer_dir, [{"files": [str(corpus)]}])
    assert _cache_files(tmp_path) == []


def test_distillation_scores_the_same_assistant_tokens(tmp_path, chat_tokenizer_dir):
    """The chat batch's targets drive both terms: changing the teacher at prompt positions changes
    nothing, changing it at an answer position changes the KL."""
    import torch

    from kvforge.training.distill import DistillationConfig, distillation_loss

    rows = [{"messages": CHAT}] * 3
    source = {"files": [_jsonl(tmp_path / "chat.jsonl", rows)], "messages_field": "messages"}
    data = _data(tmp_path, chat_tokenizer_dir, [source], block_size=32)
    targets = data.train_set[0]["targets"][None]
    scored = targets != IGNORE_INDEX
    assert 0 < scored.sum() < scored.numel()
    torch.manual_seed(0)
    student, teacher = torch.randn(1, 32, 512), torch.randn(1, 32, 512)
    config = DistillationConfig(alpha=0.5)
    base = distillation_loss(student, teacher, targets, config)
    prompt_changed = teacher.clone()
    prompt_changed[~scored] += 5 * torch.randn(int((~scored).sum()), 512)
    assert torch.equal(distillation_loss(student, prompt_changed, targets, config)["loss"], base["loss"])
    answer_changed = teacher.clone()
    answer_changed[scored] += 5 * torch.randn(int(scored.sum()), 512)
    assert not torch.isclose(distillation_loss(student, answer_changed, targets, config)["kl"], base["kl"])


def test_a_yaml_list_of_sources_instantiates_through_the_cli(tmp_path):
    from kvforge.training.lightning_cli import KVForgeCLI

    corpus = _jsonl(tmp_path / "a.jsonl", _texts("a", 2))
    config = tmp_path / "run.yaml"
    config.write_text(
        f"""model:
  model: {{vocab_size: 320, d_model: 32, n_layers: 2, n_heads: 4, max_seq_len: 64}}
data:
  sources:
    - {{files: [{corpus}], weight: 2, name: web}}
    - {{hub: parquet, data_files: [{corpus}], messages_field: messages, max_tokens: 1000}}
trainer: {{max_steps: 1, accelerator: cpu, logger: false}}
"""
    )
    sources = KVForgeCLI(args=["--config", str(config)], run=False).datamodule.sources
    assert [(s.name, s.weight, s.hub, s.chat, s.max_tokens) for s in sources] == [
        ("web", 2.0, None, False, None),
        ("sources[1]", 1.0, "parquet", True, 1000),
    ]
