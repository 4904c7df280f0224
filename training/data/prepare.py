"""One source → one cached token stream, prepared once per node and memory-mapped by every rank.

The cache key is cheap to compute (see ``Source.fingerprint``: sizes and mtimes, never the bytes), so a
restart with the cache in place does O(files) work whatever the corpus size. The fingerprint is taken
again before the entry is published: a corpus that changed while it was being tokenized is an error and
leaves nothing in the cache.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

from .documents import Field, Piece, iter_hub_pieces, iter_pieces
from .encode import Conventions
from .sources import Source
from .token_cache import TokenStream, cache_key, load_stream, tokenize_to_cache


def source_pieces(source: Source) -> Iterator[Piece]:
    """The documents of ``source`` (errors name ``data.<source>.<option>``)."""
    option = "messages_field" if source.chat else "text_field"
    field = Field(source.field_name, source.chat, f"data.{source.name}.{option}")
    if source.hub is not None:
        where = f"data.{source.name}.hub"
        return iter_hub_pieces(
            source.hub, source.hub_config, source.split, field, data_files=source.data_files, where=where
        )
    return iter_pieces(source.paths, text_field=field, txt_separator=source.txt_separator, split=source.split)


def stream_key(
    source: Source, fingerprint: str, tokenizer_fingerprint: str, conventions: Conventions, tokenizer
):
    template = getattr(tokenizer, "chat_template", None) if source.chat else None
    return cache_key(
        data=fingerprint,
        tokenizer=tokenizer_fingerprint,
        template=hashlib.sha256(str(template).encode()).hexdigest() if template else None,
        conventions=conventions.key(),
        **source.options(),
    )


def prepare_stream(
    source: Source,
    tokenizer,
    *,
    tokenizer_fingerprint: str,
    conventions: Conventions,
    cache_dir: Path,
    create: bool,
    num_proc: int,
    fingerprint: str | None = None,
) -> TokenStream:
    """The cached stream of ``source``; ``create`` tokenizes it when absent (else: an error)."""
    fingerprint = fingerprint or source.fingerprint()
    directory = (
        cache_dir / "tokens" / stream_key(source, fingerprint, tokenizer_fingerprint, conventions, tokenizer)
    )
    stream = load_stream(directory)
    if stream is not None:
        return stream
    if not create:
        raise FileNotFoundError(f"no tokenized cache in {directory}: run prepare_data() first")

    def unchanged() -> None:
        if source.fingerprint() != fingerprint:
            raise ValueError(
                f"data.{source.name}: the corpus changed while it was being prepared (file sizes or modification "
                "times differ from when it started); nothing was cached. Run again once it no longer changes"
            )

    return tokenize_to_cache(
        source_pieces(source),
        tokenizer,
        directory,
        conventions=conventions,
        what=source.name,
        num_proc=num_proc,
        max_tokens=source.max_tokens,
        loss_mask=source.chat,
        before_publish=unchanged,
    )
