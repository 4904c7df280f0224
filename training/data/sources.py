"""The sources of a training mixture: what each one reads, how much of it, and how often it is drawn.

A source is one of
- ``files``: paths or globs of ``.txt``/``.md``, ``.jsonl``/``.json`` (JSON lines), ``.parquet``, ``.arrow``
  files, or saved ``datasets`` directories;
- ``hub``: a ``datasets.load_dataset`` name (a hub id, or a builder such as ``parquet`` with
  ``data_files``), always opened with ``streaming=True`` so nothing is downloaded up front.

Each record gives a document through ``text_field`` or, for chat data, ``messages_field`` (a list of
``{"role", "content"}``). ``weight`` sets how often the mixture draws from the source (blocks, i.e.
tokens, in proportion to the weights); ``max_tokens`` caps the tokens read from it.

The cache fingerprint of a file source is cheap on purpose: the path, size and modification time of every
file, never its bytes, so a restart costs O(number of files) whatever the corpus size.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path

from .documents import TEXT_SUFFIXES, resolve_files


@dataclass
class Source:
    """Args:
    files: paths or globs (txt, md, jsonl, json, parquet, arrow) or saved ``datasets`` directories.
    hub: a ``datasets.load_dataset`` name, opened with ``streaming=True`` (exclusive with ``files``).
    hub_config: the dataset configuration (``load_dataset``'s second argument).
    data_files: ``data_files`` of a builder ``hub`` source (e.g. ``hub: parquet``).
    split: the split of a hub source or of a saved ``DatasetDict``.
    text_field: the column / JSON key holding the text.
    messages_field: the column holding chat messages instead (rendered with the chat template; only
        assistant tokens carry loss).
    txt_separator: splits ``.txt`` files into documents; ``None`` = one document per file.
    weight: relative share of the training blocks drawn from this source (> 0).
    max_tokens: read at most this many tokens from the source (``None`` = all of it).
    name: how errors and logs call the source (default ``sources[i]``).
    """

    files: list[str] | None = None
    hub: str | None = None
    hub_config: str | None = None
    data_files: list[str] | None = None
    split: str = "train"
    text_field: str = "text"
    messages_field: str | None = None
    txt_separator: str | None = None
    weight: float = 1.0
    max_tokens: int | None = None
    name: str | None = None
    paths: list[Path] = field(default_factory=list, init=False, repr=False)

    @property
    def chat(self) -> bool:
        return self.messages_field is not None

    @property
    def field_name(self) -> str:
        return self.messages_field if self.chat else self.text_field

    def validate(self, label: str, files_field: str | None = None) -> Source:
        """Check every option (errors name ``label``, the field and what is allowed) and resolve globs;
        ``files_field`` is how errors call ``files`` (default ``<label>.files``)."""
        self.name = self.name or label
        where = self.name
        if (self.files is None) == (self.hub is None):
            raise ValueError(
                f"data.{where}: give exactly one of files (paths/globs) or hub (a load_dataset name); "
                f"got files={self.files!r}, hub={self.hub!r}"
            )
        if not isinstance(self.weight, int | float) or not math.isfinite(self.weight) or self.weight <= 0:
            raise ValueError(f"data.{where}.weight={self.weight!r}: must be a finite number > 0")
        if self.max_tokens is not None and self.max_tokens <= 0:
            raise ValueError(f"data.{where}.max_tokens={self.max_tokens}: must be > 0, or null for all")
        if self.chat and self.txt_separator is not None:
            raise ValueError(f"data.{where}: txt_separator applies to text, not to messages_field")
        if self.data_files is not None and self.hub is None:
            raise ValueError(f"data.{where}.data_files: only for hub sources (e.g. hub: parquet)")
        if self.files is not None:
            if not self.files:
                raise ValueError(f"data.{where}.files: empty list; give at least one path or glob")
            self.paths = resolve_files(list(self.files), files_field or f"{where}.files")
            if self.chat and any(p.suffix in TEXT_SUFFIXES for p in self.paths):
                raise ValueError(
                    f"data.{where}: messages_field={self.messages_field!r} needs records (jsonl, json, "
                    "parquet, arrow, datasets directories), not plain text files"
                )
        return self

    def fingerprint(self) -> str:
        """Path, size and mtime of every file (O(files), never the bytes); the name for hub sources."""
        if self.hub is not None:
            return json.dumps(["hub", self.hub, self.hub_config, self.split, self.data_files_state()])
        digest = hashlib.sha256()
        for path in self.paths:
            for file in _files_under(path):
                stat = file.stat()
                digest.update(f"{file.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
        return digest.hexdigest()

    def data_files_state(self) -> list | None:
        """Local ``data_files`` of a builder source, with their sizes and mtimes (they can change too)."""
        if not self.data_files:
            return None
        state = []
        for pattern in self.data_files:
            for file in resolve_files([pattern], f"{self.name}.data_files"):
                stat = file.stat()
                state.append([str(file.resolve()), stat.st_size, stat.st_mtime_ns])
        return state

    def options(self) -> dict:
        """What, besides the data and the tokenizer, determines the tokens (part of the cache key)."""
        return {
            "field": self.field_name,
            "chat": self.chat,
            "txt_separator": self.txt_separator,
            "split": self.split,
            "max_tokens": self.max_tokens,
        }


def _files_under(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]


def resolve_sources(sources: list[Source]) -> list[Source]:
    """Validate every source; names default to ``sources[i]``."""
    if not sources:
        raise ValueError("data.sources: empty list; give at least one source")
    resolved = []
    allowed = [f.name for f in fields(Source) if f.init]
    for index, source in enumerate(sources):
        if isinstance(source, dict):
            unknown = sorted(set(source) - set(allowed))
            if unknown:
                raise ValueError(f"data.sources[{index}]: unknown option(s) {unknown}; allowed are {allowed}")
            source = Source(**source)
        resolved.append(source.validate(f"sources[{index}]"))
    names = [s.name for s in resolved]
    if len(set(names)) != len(names):
        raise ValueError(f"data.sources: names must be unique, got {names}")
    return resolved
