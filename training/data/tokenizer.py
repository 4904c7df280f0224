"""The tokenizer of a from-scratch run: a byte-level BPE trained on the training text and saved as a
Hugging Face tokenizer directory, so that the exported model ships with it (a model's own tokenizer
loads with :func:`kvforge.conversion.loading.load_tokenizer`)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

from kvforge.conversion import atomic_directory

BPE_EOS = "<|endoftext|>"
BYTE_ALPHABET = 256


def tokenizer_fingerprint(tokenizer) -> str:
    """Changes whenever the ids a text maps to could change."""
    digest = hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode())
    digest.update(f"{tokenizer.bos_token_id}/{tokenizer.eos_token_id}/{len(tokenizer)}".encode())
    return digest.hexdigest()


def train_byte_bpe(texts: Iterable[str], vocab_size: int, out_dir: Path) -> Path:
    """Train a GPT-2-style byte-level BPE of exactly ``vocab_size`` entries (``<|endoftext|>`` = EOS)
    and save it as a ``PreTrainedTokenizerFast`` directory (written atomically)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < BYTE_ALPHABET + 1:
        raise ValueError(
            f"model.vocab_size={vocab_size}: a byte-level BPE needs at least {BYTE_ALPHABET + 1} entries "
            "(256 bytes + EOS); give data.tokenizer instead"
        )
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BPE_EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=BPE_EOS)
    with atomic_directory(out_dir, overwrite=True) as tmp:
        wrapped.save_pretrained(tmp)
    return out_dir
