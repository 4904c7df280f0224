"""The tokenizer of a model directory as GGUF metadata, read with the `gguf` package's own vocab classes
(the ones llama.cpp's converter uses): a sentencepiece ``tokenizer.model`` (tokenizer model ``llama``:
pieces, scores, token types) or a byte-level BPE ``tokenizer.json`` (``gpt2``: tokens and merges), then
the special ids, ``add_bos``/``add_eos`` and the chat template (``SpecialVocab``).

A BPE vocabulary also needs llama.cpp's name for its pre-tokenizer (``tokenizer.ggml.pre``): the one
recorded when the directory was imported from a GGUF (``kvforge_provenance.json``), else ``gpt-2``
(llama.cpp's name for the GPT-2 split regex of a plain byte-level pre-tokenizer).
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import gguf
from gguf.vocab import BpeVocab, SentencePieceVocab, SpecialVocab

from .reading import read_provenance

VOCABS = (SentencePieceVocab, BpeVocab)


def add_tokenizer(writer: gguf.GGUFWriter, directory: Path | None, vocab_size: int) -> str:
    """Write the tokenizer of ``directory`` into ``writer``; returns a line saying what was written."""
    vocab = _open_vocab(directory) if directory is not None else None
    if vocab is None:
        raise ValueError(
            f"{directory}: no tokenizer llama.cpp can use (a sentencepiece tokenizer.model or a byte-level BPE "
            "tokenizer.json); llama.cpp cannot load a GGUF without one"
        )
    tokens, scores, types = [], [], []
    for text, score, kind in vocab.all_tokens():
        tokens.append(text)
        scores.append(score)
        types.append(kind)
    if len(tokens) > vocab_size:
        raise ValueError(
            f"{directory}: the tokenizer has {len(tokens)} tokens, the model's vocab_size is {vocab_size}"
        )
    for index in range(len(tokens), vocab_size):  # embedding rows without a token (padded vocabularies)
        tokens.append(f"[PAD{index}]".encode())
        scores.append(-1000.0)
        types.append(gguf.TokenType.UNUSED)
    writer.add_tokenizer_model(vocab.tokenizer_model)
    pre = None
    if vocab.tokenizer_model == "gpt2":
        pre = (read_provenance(directory) or {}).get("tokenizer_pre") or "gpt-2"
        writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    with _named(directory):
        special = SpecialVocab(directory, load_merges=vocab.tokenizer_model == "gpt2", n_vocab=vocab_size)
    special.add_to_gguf(writer, quiet=True)
    if vocab.tokenizer_model == "gpt2" and not special.merges:
        writer.add_token_merges(
            []
        )  # llama.cpp refuses a BPE vocabulary without the key (a byte-only one has none)
    template = "a chat template" if special.chat_template else "no chat template"
    return (
        f"tokenizer {vocab.tokenizer_model}{f' (pre {pre})' if pre else ''}, {len(tokens)} tokens, {template}"
    )


def _open_vocab(directory: Path):
    logging.getLogger("gguf.vocab").setLevel(logging.ERROR)
    for kind in VOCABS:
        if kind is SentencePieceVocab and not (Path(directory) / "tokenizer.model").is_file():
            continue  # (it would look for one in the parent folder too)
        try:
            with _named(directory):
                return kind(Path(directory))
        except (FileNotFoundError, TypeError):
            continue
    return None


@contextlib.contextmanager
def _named(directory: Path):
    """gguf's vocab readers parse the tokenizer files as they are: a broken one is an error naming the directory."""
    try:
        yield
    except (ValueError, KeyError, IndexError, AttributeError, RecursionError) as err:
        why = " ".join(str(err).split())
        raise ValueError(
            f"{directory}: its tokenizer files cannot be read ({type(err).__name__}: {why})"
        ) from err
