"""Reading evaluation text: the README's procedure for plain text, rows of data files, clear errors."""

from __future__ import annotations

import json

import pytest

from kvforge.evaluation import load_corpus, read_text
from tests.evaluation.helpers import stories260k


@pytest.fixture(scope="module")
def tokenizer():
    return stories260k().tokenizer


def test_text_file_is_read_with_universal_newlines_and_without_a_byte_order_mark(tmp_path):
    path = tmp_path / "crlf.txt"
    path.write_bytes("\ufeffOne day.\r\nTwo days.\r\n".encode())
    assert read_text(path) == "One day.\nTwo days.\n"


def test_jsonl_rows_are_joined_with_blank_lines(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps({"story": s}) + "\n" for s in ("Tom ran.", "Sue sat.")))
    assert read_text(path, text_field="story") == "Tom ran.\n\nSue sat."


def test_max_tokens_keeps_the_first_tokens_and_records_the_full_length(tmp_path, tokenizer):
    path = tmp_path / "story.txt"
    path.write_text("Once upon a time there was a little dog. " * 20)
    full = load_corpus(path, tokenizer)
    cut = load_corpus(path, tokenizer, max_tokens=10)
    assert cut.ids.tolist() == full.ids[:10].tolist()
    assert cut.n_available == full.ids.numel() > 10


def test_empty_evaluation_file_is_a_clear_error(tmp_path, tokenizer):
    path = tmp_path / "empty.txt"
    path.write_text(" \n\n")
    with pytest.raises(ValueError, match=r"empty\.txt is empty: nothing to score"):
        load_corpus(path, tokenizer)


def test_missing_evaluation_file_is_a_clear_error(tmp_path, tokenizer):
    with pytest.raises(FileNotFoundError, match=r"missing\.txt does not exist"):
        load_corpus(tmp_path / "missing.txt", tokenizer)


def test_unknown_text_column_is_a_clear_error(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps({"story": "Tom ran."}) + "\n")
    with pytest.raises(ValueError, match=r"text_field='text' is not a column \(columns: \['story'\]\)"):
        read_text(path)


def test_unsupported_file_suffix_is_a_clear_error(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"\x00\x01")
    with pytest.raises(ValueError, match=r"suffix '\.bin' is not a supported evaluation format"):
        read_text(path)
