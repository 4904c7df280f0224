"""Evaluation text → one stream of token ids.

Plain text files are read as the data README's loss procedure reads them (UTF-8 with universal
newlines; a byte-order mark is dropped) and tokenized as one stream without special tokens.
``.json``/``.jsonl``/``.csv``/``.parquet`` files are read with ``datasets`` and the ``text_field``
of every row is joined with blank lines (the usual WikiText perplexity recipe).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

DATASET_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
TEXT_SUFFIXES = (".txt", ".md", ".text")


@dataclass
class Corpus:
    """A named token stream; ``n_available`` counts the tokens before ``max_tokens`` cut it."""

    name: str
    ids: torch.Tensor
    n_available: int


def read_text(path: str | Path, text_field: str = "text") -> str:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"evaluation text {path} does not exist")
    suffix = path.suffix.lower()
    if suffix in DATASET_BUILDERS:
        import datasets

        rows = datasets.load_dataset(DATASET_BUILDERS[suffix], data_files=str(path), split="train")
        if text_field not in rows.column_names:
            raise ValueError(
                f"{path}: text_field={text_field!r} is not a column (columns: {rows.column_names})"
            )
        text = "\n\n".join(rows[text_field])
    elif suffix in TEXT_SUFFIXES or not suffix:
        with open(path, encoding="utf-8-sig") as handle:
            text = handle.read()
    else:
        allowed = sorted((*TEXT_SUFFIXES, *DATASET_BUILDERS))
        raise ValueError(f"{path}: suffix {suffix!r} is not a supported evaluation format ({allowed})")
    if not text.strip():
        raise ValueError(f"evaluation text {path} is empty: nothing to score")
    return text


def load_corpus(
    path: str | Path, tokenizer, *, max_tokens: int | None = None, text_field: str = "text"
) -> Corpus:
    """Tokenize a file as one stream (no BOS/EOS added); ``max_tokens`` keeps the first N tokens."""
    if tokenizer is None:
        raise ValueError(
            f"cannot tokenize {path}: the model has no tokenizer files; pass a tokenizer directory"
        )
    if max_tokens is not None and max_tokens < 2:
        raise ValueError(f"max_tokens={max_tokens} must be at least 2 (one input and one target)")
    # verbose=False: a corpus is meant to be longer than the model's context; windows cut it later.
    ids = tokenizer.encode(read_text(path, text_field), add_special_tokens=False, verbose=False)
    if len(ids) < 2:
        raise ValueError(f"evaluation text {path} has {len(ids)} token(s); at least 2 are needed")
    kept = ids[:max_tokens] if max_tokens else ids
    return Corpus(Path(path).stem, torch.tensor(kept, dtype=torch.long), len(ids))
