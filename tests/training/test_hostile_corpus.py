"""Corpora from the wild: invalid UTF-8 is an error naming the file and the byte offset (nothing cached),
blank lines are text or skipped rows, and a single 100 MB line reaches the tokenizer in bounded pieces."""

from __future__ import annotations

import json
import warnings

import pytest

from kvforge.training.data import documents
from kvforge.training.data.documents import iter_pieces
from kvforge.training.lightning_cli import KVForgeCLI
from tests.training.helpers import cli_args, tiny_corpus, tiny_yaml

MB = 1 << 20


@pytest.mark.parametrize("suffix", [".txt", ".jsonl"])
def test_invalid_utf8_names_the_file_and_the_byte_offset(tmp_path, suffix):
    path = tmp_path / f"latin1{suffix}"
    path.write_bytes(b'{"text": "caf\xe9"}\n' if suffix == ".jsonl" else b"hello\ncaf\xe9 au lait\n")
    offset = path.read_bytes().index(b"\xe9")
    with pytest.raises(
        ValueError, match=rf"latin1{suffix}: not valid UTF-8 \(first invalid byte at offset {offset}\)"
    ):
        list(iter_pieces([path]))


def test_invalid_utf8_offset_is_exact_after_a_character_straddling_a_read_block(tmp_path):
    path = tmp_path / "big.txt"
    path.write_bytes(b"a" * (MB - 1) + "é".encode() + b"b" * 10 + b"\xff")  # é's 2 bytes straddle 1 MiB
    with pytest.raises(ValueError, match=rf"offset {MB + 11}\)"):
        list(iter_pieces([path]))


def test_truncated_utf8_sequence_at_the_end_of_the_file_is_reported(tmp_path):
    path = tmp_path / "cut.txt"
    path.write_bytes(b"fine text " + "é".encode()[:1])
    with pytest.raises(ValueError, match=r"offset 10\)"):
        list(iter_pieces([path]))


def test_invalid_utf8_in_training_data_stops_before_anything_is_cached(tmp_path):
    good = tiny_corpus(tmp_path, chars=3_000)
    bad = tmp_path / "bad.txt"
    bad.write_bytes(good.read_bytes() + b"\n\xff\xfe")
    cache = tmp_path / "cache"
    with pytest.raises(ValueError, match=r"bad\.txt: not valid UTF-8"):
        KVForgeCLI(args=cli_args("fit", tiny_yaml(tmp_path, bad, cache), tmp_path / "run"))
    leftovers = [p for p in cache.rglob("*") if p.is_file()] if cache.exists() else []
    assert leftovers == []
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_blank_lines_are_text_in_txt_and_skipped_rows_in_jsonl(tmp_path):
    txt = tmp_path / "blank.txt"
    txt.write_text("first\n\n\n\nsecond\n")
    jsonl = tmp_path / "blank.jsonl"
    jsonl.write_text('\n{"text": "first"}\n\n   \n{"text": "second"}\n\n')
    assert [p.text for p in iter_pieces([txt])] == ["first\n\n\n\nsecond\n"]
    assert [p.text for p in iter_pieces([jsonl])] == ["first", "second"]


def test_a_single_100mb_line_is_read_in_bounded_pieces(tmp_path):
    path = tmp_path / "one_line.txt"
    word = "lorem ipsum dolor sit amet "
    with open(path, "w") as handle:
        handle.write(word * (100 * MB // len(word)))
    limit = 2 * documents.TEXT_PIECE_CHARS
    total, longest, pieces = 0, 0, 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # cuts before spaces are clean: no warning
        for piece in iter_pieces([path]):
            total, longest, pieces = total + len(piece.text), max(longest, len(piece.text)), pieces + 1
    assert total == path.stat().st_size and longest <= limit and pieces >= 100 * MB // limit


def test_long_run_without_whitespace_is_cut_with_a_warning(tmp_path, monkeypatch):
    monkeypatch.setattr(documents, "TEXT_PIECE_CHARS", 100)
    path = tmp_path / "blob.txt"
    path.write_text("x" * 1_000)
    with pytest.warns(UserWarning, match=r"blob\.txt: \d+ run\(s\) of over 100 characters without a space"):
        pieces = list(iter_pieces([path]))
    assert "".join(p.text for p in pieces) == "x" * 1_000 and max(len(p.text) for p in pieces) <= 200
    assert [p.ends_document for p in pieces] == [False] * (len(pieces) - 1) + [True]


def test_long_document_between_separators_keeps_its_boundaries(tmp_path, monkeypatch):
    monkeypatch.setattr(documents, "TEXT_PIECE_CHARS", 100)
    long_document = " ".join(f"w{i}" for i in range(300))
    path = tmp_path / "docs.txt"
    path.write_text(f"{long_document}<|sep|>short one<|sep|>")
    pieces = list(iter_pieces([path], txt_separator="<|sep|>"))
    documents_read, current = [], ""
    for piece in pieces:
        current += piece.text
        if piece.ends_document:
            documents_read.append(current)
            current = ""
    assert documents_read == [long_document, "short one"]
    assert max(len(p.text) for p in pieces) <= 200


def test_jsonl_that_is_not_json_names_the_line(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps({"text": "ok"}) + "\nnot json\n")
    with pytest.raises(ValueError, match=r"rows\.jsonl:2: not a JSON object per line"):
        list(iter_pieces([path]))
