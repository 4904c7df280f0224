"""Where training text comes from: local files, a saved ``datasets`` directory, or a hub dataset.

Everything streams: files are read in pieces, Parquet by record batch, datasets by batch, so a corpus
never has to fit in memory.

What a *document* is (EOS goes between documents):
- ``.txt``: the whole file, unless ``txt_separator`` is set (e.g. ``"<|endoftext|>"`` or ``"\\n\\n"``),
  which splits it. The default keeps a file whole because a blank line separates paragraphs as often
  as documents (TinyStories), and an EOS between paragraphs would teach the model to stop early.
- ``.jsonl`` / ``.json`` (JSON lines), ``.parquet``, ``.arrow``, ``datasets`` directories, hub datasets:
  one row, its ``text_field`` (or its ``messages_field`` for chat data: a list of role/content messages).
Empty documents are skipped.
"""

from __future__ import annotations

import codecs
import glob
import json
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .chat import check_messages

TEXT_SUFFIXES = (".txt", ".md")
JSON_SUFFIXES = (".jsonl", ".json")
PARQUET_SUFFIXES = (".parquet",)
ARROW_SUFFIXES = (".arrow",)
ALLOWED_SUFFIXES = TEXT_SUFFIXES + JSON_SUFFIXES + PARQUET_SUFFIXES + ARROW_SUFFIXES
# A long .txt document is handed to the tokenizer in pieces of about this many characters, cut at line
# ends where it has them (see _cut): a single 100 MB line must not become one 100 MB tokenizer call.
TEXT_PIECE_CHARS = 1 << 22
ROW_BATCH = 1000


@dataclass(frozen=True)
class Piece:
    """A span of text; ``ends_document`` is False while the same document continues in the next piece.
    A chat record is one piece whose ``messages`` (role/content dicts) replace ``text``."""

    text: str
    ends_document: bool = True
    messages: list[dict] | None = None


def is_dataset_dir(path: Path) -> bool:
    return path.is_dir() and any(
        (path / name).is_file() for name in ("dataset_info.json", "dataset_dict.json", "state.json")
    )


def resolve_files(patterns: list[str], field: str) -> list[Path]:
    """Expand paths and globs; every entry must match something readable."""
    paths: list[Path] = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        if not matches or not Path(matches[0]).exists():
            raise FileNotFoundError(f"data.{field}: {pattern!r} does not exist (matched no file)")
        for match in map(Path, matches):
            if match.is_dir() and not is_dataset_dir(match):
                raise ValueError(
                    f"data.{field}: {match} is a directory but not a saved `datasets` dataset "
                    "(no dataset_info.json / dataset_dict.json); list its files or a glob instead"
                )
            if match.is_file() and match.suffix not in ALLOWED_SUFFIXES:
                raise ValueError(
                    f"data.{field}: {match} has suffix {match.suffix!r}; allowed are {list(ALLOWED_SUFFIXES)} "
                    "or a `datasets` directory"
                )
            paths.append(match)
    return paths


@dataclass(frozen=True)
class Field:
    """Which record field holds a document, and whether it is chat messages (``chat``) or text."""

    name: str = "text"
    chat: bool = False
    label: str = "data.text_field"  # how errors name the option that chose the field

    def describe(self) -> str:
        return f"{self.label}={self.name!r}"


TEXT = Field()


def iter_pieces(
    paths: list[Path],
    *,
    text_field: str | Field = "text",
    txt_separator: str | None = None,
    split: str = "train",
) -> Iterator[Piece]:
    field = text_field if isinstance(text_field, Field) else Field(text_field)
    for path in paths:
        if path.is_dir():
            yield from _dataset_dir(path, field, split)
        elif path.suffix in TEXT_SUFFIXES:
            yield from _text_file(path, txt_separator)
        elif path.suffix in JSON_SUFFIXES:
            yield from _json_lines(path, field)
        elif path.suffix in ARROW_SUFFIXES:
            yield from _arrow(path, field)
        else:
            yield from _parquet(path, field)


def iter_hub_pieces(
    name: str,
    config: str | None,
    split: str,
    text_field: str | Field,
    *,
    data_files: list[str] | None = None,
    where: str = "data.dataset",
) -> Iterator[Piece]:
    """Rows of ``datasets.load_dataset(name, config, split=split, streaming=True)``: nothing is
    downloaded or tokenized ahead, so the first piece comes after O(one row group) of work."""
    import datasets

    field = text_field if isinstance(text_field, Field) else Field(text_field)
    try:
        rows = datasets.load_dataset(name, config, split=split, streaming=True, data_files=data_files)
    except Exception as err:  # the hub raises many types; the message is what matters
        raise ValueError(
            f"{where}={name!r}: could not load it from the Hugging Face hub ({err}); offline runs "
            "(HF_DATASETS_OFFLINE=1) need local files, a saved dataset directory, or the hub cache"
        ) from err
    for row in rows:
        yield from _row_piece(row, field, f"{name}[{split}]")


def _text_file(path: Path, separator: str | None) -> Iterator[Piece]:
    try:
        yield from _text_pieces(path, separator)
    except UnicodeDecodeError:
        raise invalid_utf8(path) from None


def _text_pieces(path: Path, separator: str | None) -> Iterator[Piece]:
    """Pieces of at most ~2 × TEXT_PIECE_CHARS characters, whatever the file's line lengths."""
    keep = len(separator) - 1 if separator else 0  # a separator may straddle the end of what was read
    hard_cuts = 0
    with open(path, encoding="utf-8-sig") as handle:  # universal newlines; a BOM is not text
        pending, open_document = "", False  # open_document: part of the current one went out already
        while chunk := handle.read(TEXT_PIECE_CHARS):
            pending += chunk
            if separator is not None:
                *documents, pending = pending.split(separator)
                for document in documents:
                    if open_document or document.strip():
                        yield Piece(document)
                    open_document = False
            while len(pending) - keep >= TEXT_PIECE_CHARS:
                cut, clean = _cut(pending, len(pending) - keep)
                hard_cuts += not clean
                yield Piece(pending[:cut], ends_document=False)
                pending, open_document = pending[cut:], True
        if open_document or pending.strip():
            yield Piece(pending)
    if hard_cuts:
        warnings.warn(
            f"{path}: {hard_cuts} run(s) of over {TEXT_PIECE_CHARS:,} characters without a space or line end "
            "were cut into pieces mid-run (tokens at each cut may differ from tokenizing the run whole)",
            stacklevel=2,
        )


def _cut(text: str, limit: int) -> tuple[int, bool]:
    """Where a piece of a long document ends: after the last line end, else before the last space
    (where the byte-level pre-tokenizer splits anyway), else at ``limit`` (text without whitespace)."""
    for cut in (text.rfind("\n", 0, limit) + 1, text.rfind(" ", 0, limit)):
        if cut > limit // 2:
            return cut, True
    return limit, False


def invalid_utf8(path: Path) -> ValueError:
    """The error for a file that is not UTF-8, with the byte offset of the first bad byte."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with open(path, "rb") as handle:
        while block := handle.read(1 << 20):
            buffered = len(decoder.getstate()[0])  # an incomplete sequence carried from the last block
            try:
                decoder.decode(block)
            except UnicodeDecodeError as err:
                offset += err.start - buffered
                break
            offset += len(block)
        else:
            try:
                decoder.decode(b"", final=True)
            except UnicodeDecodeError as err:
                offset += err.start - len(err.object)
    return ValueError(
        f"{path}: not valid UTF-8 (first invalid byte at offset {offset}); kvforge reads text as UTF-8 and "
        "never guesses an encoding. Convert it, e.g. iconv -f latin1 -t utf-8"
    )


def _json_lines(path: Path, field: Field) -> Iterator[Piece]:
    try:
        yield from _json_line_pieces(path, field)
    except UnicodeDecodeError:
        raise invalid_utf8(path) from None


def _json_line_pieces(path: Path, field: Field) -> Iterator[Piece]:
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{number}: not a JSON object per line ({err})") from err
            yield from _row_piece(row, field, f"{path}:{number}")


def _parquet(path: Path, field: Field) -> Iterator[Piece]:
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(path)
    _check_column(path, field, parquet.schema_arrow.names)
    first = 0
    for batch in parquet.iter_batches(batch_size=ROW_BATCH, columns=[field.name]):
        yield from _column_pieces(batch.column(0).to_pylist(), field, path, first)
        first += batch.num_rows


def _arrow(path: Path, field: Field) -> Iterator[Piece]:
    """An Arrow file as ``datasets`` writes it (``Dataset.from_file``: memory-mapped, streamed by batch)."""
    import datasets

    yield from _rows_of(datasets.Dataset.from_file(str(path)), field, path)


def _dataset_dir(path: Path, field: Field, split: str) -> Iterator[Piece]:
    import datasets

    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise ValueError(f"{path}: no split {split!r} (the source's split); splits are {list(loaded)}")
        loaded = loaded[split]
    yield from _rows_of(loaded, field, path)


def _rows_of(rows, field: Field, path: Path) -> Iterator[Piece]:
    _check_column(path, field, rows.column_names)
    for first, batch in enumerate(rows.select_columns([field.name]).iter(batch_size=ROW_BATCH)):
        yield from _column_pieces(batch[field.name], field, path, first * ROW_BATCH)


def _check_column(path: Path, field: Field, columns: list[str]) -> None:
    if field.name not in columns:
        raise ValueError(f"{path}: no column {field.describe()}; columns are {columns}")


def _column_pieces(values: list, field: Field, path: Path, first_row: int) -> Iterator[Piece]:
    if field.chat:
        for number, messages in enumerate(values, first_row):
            yield from _chat_piece(messages, field, f"{path} row {number}")
        return
    for text in values:
        if text and text.strip():
            yield Piece(text)


def _row_piece(row: object, field: Field, where: str) -> Iterator[Piece]:
    if not isinstance(row, dict) or field.name not in row:
        keys = sorted(row) if isinstance(row, dict) else type(row).__name__
        raise ValueError(f"{where}: no {field.describe()} (the row has {keys})")
    if field.chat:
        yield from _chat_piece(row[field.name], field, where)
        return
    text = row[field.name]
    if not isinstance(text, str):
        raise ValueError(f"{where}: {field.describe()} holds {type(text).__name__}, not text")
    if text.strip():
        yield Piece(text)


def _chat_piece(messages: object, field: Field, where: str) -> Iterator[Piece]:
    checked = check_messages(messages, f"{where}: {field.describe()}")
    if checked:
        yield Piece("", messages=checked)
