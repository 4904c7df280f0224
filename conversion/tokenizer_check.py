"""Does stock ``AutoTokenizer`` still tokenize an export the way it tokenized the source?

An export keeps the source's tokenizer files, but transformers chooses the tokenizer class from the
config's ``model_type`` for some families: for ``qwen2`` it always builds ``Qwen2Tokenizer`` (Qwen's
byte-level pre-tokenizer), whatever ``tokenizer_config.json`` says. A Llama-2/Mistral-v0.1 style
(SentencePiece, Metaspace) tokenizer exported as Qwen2 then splits text into different ids, and the
model reads garbage through stock loading (stories260K: 9,478 of 9,601 ids differ). A Llama-3 style
byte-level tokenizer differs too, on digits. This check tokenizes one probe text from both
directories and reports the first difference.
"""

from __future__ import annotations

import logging
from pathlib import Path

PROBE = (
    "The year 2024 had 366 days; 1234567 is a number.\n\n  Indented  text,\ttabs and  double spaces.\n"
    "Café naïve façade, Straße, 東京, Привет, 😀! def f(x):\n    return x ** 2  # code\n"
    'Once upon a time, there was a little girl named Lily. She said: "It\'s fun!"'
)
log = logging.getLogger(__name__)


def tokenizer_mismatch(source: str | Path, exported: str | Path) -> str | None:
    """A sentence naming the difference when ``AutoTokenizer`` tokenizes :data:`PROBE` differently from
    ``exported`` than from ``source``; None when they agree, or when either directory has no tokenizer
    that stock transformers loads (nothing to compare: a kvforge-typed source, a weights-only one)."""
    from transformers import AutoTokenizer

    loaded = []
    for directory in (source, exported):
        directory = Path(directory)
        if not directory.is_dir() or not any(
            (directory / name).is_file() for name in ("tokenizer.json", "tokenizer.model", "vocab.json")
        ):
            return None
        try:
            loaded.append(AutoTokenizer.from_pretrained(str(directory)))
        except (OSError, ValueError, KeyError, ImportError) as error:  # unloadable: not ours to judge
            log.info("tokenizer check skipped: %s does not load with AutoTokenizer (%s)", directory, error)
            return None
    before, after = (tok(PROBE, add_special_tokens=False)["input_ids"] for tok in loaded)
    if before == after:
        return None
    names = [type(tok).__name__ for tok in loaded]
    differ = sum(a != b for a, b in zip(before, after)) + abs(len(before) - len(after))
    return (
        f"stock AutoTokenizer loads {names[1]} for {Path(exported).name} but {names[0]} for the source, and "
        f"they tokenize differently ({differ} of {len(before)} probe ids differ): transformers picks the "
        "tokenizer class from this family's model_type. Serve it with the source's tokenizer (vLLM/SGLang: "
        "--tokenizer SRC; transformers: AutoTokenizer.from_pretrained(SRC)) or export another --family"
    )
