"""Bad input fails with a clear error that names the field, before any training step runs."""

from __future__ import annotations

import pytest

from kvforge.training.data.tokenizer import train_byte_bpe
from kvforge.training.lightning_cli import KVForgeCLI
from kvforge.training.module import KVForgeLM
from tests.conftest import shared_path
from tests.training.helpers import cli_args, tiny_config, tiny_corpus, tiny_yaml


@pytest.fixture(scope="module")
def corpus_and_cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    return tiny_corpus(root, chars=3_000), root / "cache"


def _fit(tmp_path, config, *overrides):
    KVForgeCLI(args=cli_args("fit", config, tmp_path / "run", *overrides))


def _assert_nothing_trained(tmp_path):
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_missing_data_path(tmp_path, corpus_and_cache):
    config = tiny_yaml(tmp_path, *corpus_and_cache)
    with pytest.raises(
        FileNotFoundError, match=r"data\.sources\[0\]\.files: '.*nowhere\.txt' does not exist"
    ):
        _fit(tmp_path, config, "--data.sources", f"[{{files: [{tmp_path / 'nowhere.txt'}]}}]")
    _assert_nothing_trained(tmp_path)


def test_empty_corpus(tmp_path, corpus_and_cache):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    config = tiny_yaml(tmp_path, *corpus_and_cache)
    with pytest.raises(ValueError, match=r"data\.sources\[0\]: the corpus is empty"):
        _fit(
            tmp_path,
            config,
            "--data.sources",
            f"[{{files: [{empty}]}}]",
            "--data.tokenizer",
            str(shared_path("stories260K")),
            "--model.model.vocab_size",
            "512",
        )
    _assert_nothing_trained(tmp_path)


def test_tokenizer_larger_than_the_uptrained_models_vocabulary(tmp_path, corpus_and_cache):
    corpus, cache = corpus_and_cache
    big = train_byte_bpe([corpus.read_text()] * 3, 600, tmp_path / "bpe600")
    config = tiny_yaml(tmp_path, corpus, cache)
    overrides = [
        "--model.model",
        "null",
        "--model.init_from",
        str(shared_path("stories260K-mha")),
        "--data.tokenizer",
        str(big),
    ]
    with pytest.raises(
        ValueError, match=r"tokenizer .*bpe600 has \d+ tokens but the model's vocab_size is 512"
    ):
        _fit(tmp_path, config, *overrides)
    _assert_nothing_trained(tmp_path)


def test_block_size_beyond_the_models_positions(tmp_path, corpus_and_cache):
    config = tiny_yaml(tmp_path, *corpus_and_cache)
    with pytest.raises(ValueError, match=r"data\.block_size=128 exceeds the model's max_seq_len=64"):
        _fit(tmp_path, config, "--data.block_size", "128")
    _assert_nothing_trained(tmp_path)


def test_unknown_strategy(tmp_path, corpus_and_cache):
    config = tiny_yaml(tmp_path, *corpus_and_cache)
    with pytest.raises(ValueError, match="invalid strategy name: `strategy='fsdp3'`"):
        _fit(tmp_path, config, "--trainer.strategy", "fsdp3")
    _assert_nothing_trained(tmp_path)


def test_model_and_init_from_are_exclusive():
    with pytest.raises(ValueError, match=r"exactly one of model .* and init_from"):
        KVForgeLM(model=tiny_config(), init_from=str(shared_path("stories260K-mha")))
    with pytest.raises(ValueError, match="exactly one of model"):
        KVForgeLM()


def test_unknown_transform_lists_the_registered_ones():
    with pytest.raises(ValueError, match=r"model\.convert\.to='gpa': allowed values are \[.*'gqa'"):
        KVForgeLM(init_from=str(shared_path("stories260K-mha")), convert={"to": "gpa", "n_kv_heads": 2})


def test_unknown_transform_option_lists_the_allowed_ones():
    with pytest.raises(
        ValueError,
        match=r"option\(s\) \['kv_heads'\] unknown to transform 'gqa'; allowed are \[.*'n_kv_heads'",
    ):
        KVForgeLM(init_from=str(shared_path("stories260K-mha")), convert={"to": "gqa", "kv_heads": 2})


def test_staged_training_without_a_conversion_is_refused():
    with pytest.raises(ValueError, match=r"converted_only_steps=10 .* there is no model\.convert"):
        KVForgeLM(model=tiny_config(), converted_only_steps=10)


def test_unknown_trainable_lists_the_allowed_values():
    with pytest.raises(ValueError, match=r"trainable='mlp': allowed values are \['all', 'attention'\]"):
        KVForgeLM(model=tiny_config(), trainable="mlp")


def test_missing_init_from_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"model\.init_from=.* is not a directory"):
        KVForgeLM(init_from=str(tmp_path / "missing"))
