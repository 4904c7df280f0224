"""The data path at corpus scale, against ``datasets.map`` in the same run.

    python -m benchmarks.data                                   # 1 GB and 2 GB corpora, 32 MB for tokens/s
    python -m benchmarks.data --sizes-gb 0.2 --prepare-mb 16    # a quick look

Generated corpora (JSON lines of ~2 KB documents cut from the four shared text corpora, each document
tagged so none repeats) are written under ``--work`` once and reused. Measured:

1. preparation tokens/s (read, tokenize, join, write the memory-mapped cache) with 1 and 2 processes,
   against ``datasets.load_dataset("json") + .map(tokenize, batched=True, num_proc=n)`` with the same
   tokenizer (the model's, ``--tokenizer``) on the same ``--prepare-mb`` corpus;
2. time to the first training step in streaming mode (DataLoader with 2 workers, the corpus as two
   mixed sources; building the module, the first batch, one forward/backward of a small model);
3. restart overhead with a warm cache (a new DataModule finding the prepared entry: fingerprint, memory
   map, blocks) at each ``--sizes-gb``. Preparing GBs with a real tokenizer takes long on 2 cores, so
   these entries are prepared with a word-level tokenizer built here (``--restart-tokenizer word``):
   the restart path does not depend on the tokenizer, only on the files and the tokens in the entry.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

import torch

from benchmarks.common import markdown_table, print_table
from kvforge.arch import CausalLM, ModelConfig
from kvforge.conversion.loading import load_tokenizer
from kvforge.training.data import TextDataModule

SHARED = Path(os.environ.get("KVFORGE_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
CORPORA = ("tinystories_val_prefix.txt", "tinyshakespeare.txt", "botchan.txt", "wikitext2_test.txt")
FILE_MB = 64
DOC_CHARS = 2000


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--work", default="/tmp/kvforge-data-bench", help="corpora and caches go here")
    parser.add_argument("--sizes-gb", default="1,2", help="corpus sizes for first step and restart")
    parser.add_argument("--prepare-mb", type=int, default=32, help="corpus for the tokens/s comparison")
    parser.add_argument("--tokenizer", default=str(SHARED / "stories260K"))
    parser.add_argument("--restart-tokenizer", choices=("word", "model"), default="word")
    parser.add_argument("--repeats", type=int, default=3, help="best of n for tokens/s (alternating runs)")
    parser.add_argument(
        "--parts", default="prepare,scale", help="prepare (tokens/s), scale (first step, restart)"
    )
    parser.add_argument("--markdown", action="store_true")
    return parser.parse_args()


def make_corpus(directory: Path, megabytes: float) -> list[Path]:
    """JSON-lines files of ``FILE_MB`` MB (the last one smaller), reused when already written."""
    directory.mkdir(parents=True, exist_ok=True)
    text = "\n".join((SHARED / "corpora" / name).read_text(encoding="utf-8-sig") for name in CORPORA)
    total, files, number = int(megabytes * (1 << 20)), [], 0
    while total > 0:
        size = min(total, FILE_MB << 20)
        path = directory / f"part{number:04d}.jsonl"
        if not path.exists() or abs(path.stat().st_size - size) > DOC_CHARS * 4:
            _write_part(path, text, size, number)
        files.append(path)
        total -= path.stat().st_size
        number += 1
    return files


def _write_part(path: Path, text: str, size: int, number: int) -> None:
    tmp = path.with_suffix(".tmp")
    written, offset, doc = 0, (number * 7919) % len(text), 0
    with open(tmp, "w", encoding="utf-8") as out:
        while written < size:
            chunk = text[offset : offset + DOC_CHARS] or text[:DOC_CHARS]
            offset = (offset + DOC_CHARS + 13) % len(text)
            line = json.dumps({"text": f"[{number}.{doc}] {chunk}"}) + "\n"
            out.write(line)
            written += len(line.encode())
            doc += 1
    tmp.replace(path)


def word_tokenizer(directory: Path) -> str:
    """A word-level tokenizer over the shared corpora's words (fast: for preparing GB-sized caches)."""
    if (directory / "tokenizer.json").exists():
        return str(directory)
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words: dict[str, int] = {"[UNK]": 0, "[EOS]": 1}
    for name in CORPORA:
        for word in (SHARED / "corpora" / name).read_text(encoding="utf-8-sig").split():
            if len(words) < 30_000:
                words.setdefault(word, len(words))
    tokenizer = Tokenizer(models.WordLevel(words, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="[EOS]", unk_token="[UNK]").save_pretrained(
        directory
    )
    return str(directory)


def _config(tokenizer_dir: str) -> ModelConfig:
    vocab = len(load_tokenizer(tokenizer_dir))
    return ModelConfig(vocab_size=vocab, d_model=64, n_layers=2, n_heads=4, max_seq_len=512)


def _module(files, tokenizer_dir, cache: Path, **options) -> TextDataModule:
    settings = dict(
        tokenizer=tokenizer_dir, block_size=512, batch_size=8, val_fraction=0.0, cache_dir=str(cache)
    )
    settings.update(options)
    return TextDataModule(sources=[{"files": [str(f) for f in files]}], **settings)


def prepare_ours(files, tokenizer_dir, cache: Path, num_proc: int) -> tuple[float, int]:
    shutil.rmtree(cache, ignore_errors=True)
    start = time.perf_counter()
    data = _module(files, tokenizer_dir, cache, num_proc=num_proc, add_bos=False)
    data.build(_config(tokenizer_dir), None, create=True)
    return time.perf_counter() - start, len(data.train_set.stream)


def prepare_datasets_map(files, tokenizer_dir, cache: Path, num_proc: int) -> tuple[float, int]:
    import datasets

    shutil.rmtree(cache, ignore_errors=True)
    datasets.disable_progress_bars()
    tokenizer = load_tokenizer(tokenizer_dir)
    start = time.perf_counter()
    rows = datasets.load_dataset(
        "json", data_files=[str(f) for f in files], split="train", cache_dir=str(cache)
    )
    tokenized = rows.map(
        lambda batch: {"input_ids": tokenizer(batch["text"], add_special_tokens=False)["input_ids"]},
        batched=True,
        num_proc=num_proc if num_proc > 1 else None,
        remove_columns=["text"],
    )
    seconds = time.perf_counter() - start
    n_tokens = sum(len(ids) for batch in tokenized.iter(batch_size=10_000) for ids in batch["input_ids"])
    return seconds, n_tokens


def first_step_streaming(files, tokenizer_dir, cache: Path) -> float:
    """Seconds from a new DataModule to the end of the first optimizer step (2 workers, 2 sources)."""
    half = len(files) // 2 or 1
    start = time.perf_counter()
    config = _config(tokenizer_dir)
    data = TextDataModule(
        sources=[
            {"files": [str(f) for f in files[:half]], "weight": 3},
            {"files": [str(f) for f in files[half:] or files]},
        ],
        tokenizer=tokenizer_dir,
        block_size=512,
        batch_size=8,
        val_fraction=0.0,
        streaming=True,
        num_workers=2,
        cache_dir=str(cache),
    )
    data.build(config, None, create=True)
    batch = next(iter(data.train_dataloader()))
    model = CausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.loss(batch["input_ids"], batch["targets"]).backward()
    optimizer.step()
    return time.perf_counter() - start


def restart(files, tokenizer_dir, cache: Path) -> tuple[float, float, int]:
    """(cold preparation seconds, warm restart seconds, tokens) for the corpus ``files``."""
    config = _config(tokenizer_dir)
    start = time.perf_counter()
    cold = _module(files, tokenizer_dir, cache, num_proc=2)
    cold.build(config, None, create=True)
    prepared = time.perf_counter() - start
    start = time.perf_counter()
    warm = _module(files, tokenizer_dir, cache, num_proc=2)
    warm.build(config, None, create=False)  # what setup() does on every rank after prepare_data
    next(iter(warm.train_dataloader()))
    return prepared, time.perf_counter() - start, len(warm.train_set.stream)


def main() -> None:
    args = parse_args()
    torch.set_num_threads(1)
    work = Path(args.work)
    sizes = [float(s) for s in args.sizes_gb.split(",")]

    if "prepare" in args.parts:
        prepare_table(args, work)
    if "scale" in args.parts:
        scale_table(args, work, sizes)


def prepare_table(args, work: Path) -> None:
    """Best of ``repeats`` alternating runs: the machine is shared, so load changes from run to run."""
    small = make_corpus(work / f"corpus-{args.prepare_mb}mb", args.prepare_mb)
    rows = []
    for num_proc in (1, 2):
        ours = theirs = float("inf")
        for _ in range(args.repeats):
            seconds, n_ours = prepare_ours(small, args.tokenizer, work / "cache-ours", num_proc)
            ours = min(ours, seconds)
            seconds, n_theirs = prepare_datasets_map(small, args.tokenizer, work / "cache-datasets", num_proc)
            theirs = min(theirs, seconds)
        rows.append(
            [
                num_proc,
                f"{n_ours / ours:,.0f}",
                f"{n_theirs / theirs:,.0f}",
                f"{theirs / ours:.2f}",
                f"{n_ours:,}",
                f"{n_theirs:,}",
            ]
        )
    columns = [
        "processes",
        "kvforge tokens/s",
        "datasets.map tokens/s",
        "ratio",
        "kvforge tokens",
        "datasets tokens",
    ]
    title = f"Preparation of {args.prepare_mb} MB ({Path(args.tokenizer).name} tokenizer)"
    print(markdown_table(columns, rows) if args.markdown else "", end="")
    print_table(title, columns, rows)


def scale_table(args, work: Path, sizes: list[float]) -> None:
    restart_tokenizer = (
        word_tokenizer(work / "word-tokenizer") if args.restart_tokenizer == "word" else args.tokenizer
    )
    rows = []
    for gigabytes in sizes:
        files = make_corpus(work / "corpus-1gb", min(gigabytes, 1.0) * 1024)
        if gigabytes > 1:
            files += make_corpus(work / f"corpus-extra-{gigabytes:g}gb", (gigabytes - 1) * 1024)
        first = first_step_streaming(files, args.tokenizer, work / "cache-stream")
        prepared, warm, n_tokens = restart(files, restart_tokenizer, work / "cache-restart")
        size = sum(f.stat().st_size for f in files) / (1 << 30)
        rows.append(
            [f"{size:.2f} GB", len(files), f"{first:.2f}", f"{prepared:.0f}", f"{n_tokens:,}", f"{warm:.3f}"]
        )
    columns = ["corpus", "files", "streaming: first step s", "cold preparation s", "tokens", "warm restart s"]
    print(markdown_table(columns, rows) if args.markdown else "", end="")
    print_table("Streaming first step and warm-cache restart", columns, rows)


if __name__ == "__main__":
    main()
