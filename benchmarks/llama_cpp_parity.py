"""llama.cpp parity: kvforge's GGUF exports, run by llama.cpp itself, give kvforge's numbers.

    pip install -e '.[llama-cpp]'     # builds llama.cpp from source (CPU: about an hour on 2 busy cores)
    python -m benchmarks.llama_cpp_parity [--rows stories-gqa,stories-mla] [--outtypes f32,q8_0] [--markdown]

Each row is a model kvforge holds (the real stories260K, its MQA and MLA conversions, the real
SmolLM2-135M when `make real-model` fetched it, tiny random Qwen2/Qwen3/Gemma 2/Gemma 3 models with
their windows). It is exported with ``kvforge.conversion.gguf.export_gguf``, loaded by llama-cpp-python
(``logits_all``, the file's own tokenizer), and compared on the same token ids with kvforge's own model
(fp32) and stock transformers' where a stock class exists:
- max |Δ log-prob| over every position and vocabulary entry (log-softmax of both logit sets);
- perplexity of the same slice (next-token NLL) under both, and its difference;
- greedy continuation: tokens equal before the first divergence, of ``--greedy`` (argmax decoding,
  llama.cpp through its KV cache - MLA's latent cache, Gemma's sliding windows);
- tokenizer: llama.cpp's tokenization of the text (from the GGUF metadata) vs transformers'.

llama.cpp's KV cache is kept in f32 here (its default f16 rounds K/V). Tolerances by ``--outtype``: f32
1e-3 in log-probs (1e-2 for Gemma: ggml's CPU GELU goes through an f16 table), f16/bf16 and q8_0 are
reported as a perplexity delta.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import print_table
from kvforge.arch import CausalLM
from kvforge.conversion import load_pretrained
from kvforge.conversion.gguf import export_gguf

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
TINYSTORIES = SHARED / "corpora" / "tinystories_val_prefix.txt"
WIKITEXT = SHARED / "corpora" / "wikitext2_test.txt"
F32_TOLERANCE = 1e-3
# ggml's CPU GELU (Gemma's GeGLU) looks f32 inputs up in an f16 table (GGML_GELU_FP16): ~4e-3 relative.
GELU_F16_TOLERANCE = 1e-2


@dataclass
class Row:
    name: str
    build: Callable[[Path], Path]  # writes (or finds) the model directory, with its tokenizer
    text: Path | None  # evaluation text (None: random token ids, for random-weight models)
    form: str
    tokenizer: Path | None = None  # the tokenizer of the ids (None: the model directory's own)
    f32_tolerance: float = F32_TOLERANCE


def _convert(source: Path, *args: str) -> Callable[[Path], Path]:
    def build(scratch: Path) -> Path:
        from kvforge.cli.main import main

        out = scratch / "-".join(["converted", source.name, *args]).replace("/", "_")
        calibration = [] if "--calib" in args else ["--calib", "none"]  # parity needs no quality
        if not out.exists() and main(["convert", str(source), str(out), *args, *calibration]) != 0:
            raise RuntimeError(f"kvforge convert {source} {' '.join(args)} failed")
        return out

    return build


def _tiny(family: str) -> Callable[[Path], Path]:
    def build(scratch: Path) -> Path:
        import transformers

        from tests.conversion.gguf_files import FAMILIES, SIZES, write_tokenizer
        from tests.conversion.hf_tiny import randomize_

        out = scratch / f"tiny-{family}"
        if not out.exists():
            config_class, overrides = FAMILIES[family]
            model = transformers.AutoModelForCausalLM.from_config(config_class(**{**SIZES, **overrides}))
            randomize_(model.float()).save_pretrained(out)
            write_tokenizer(out)
        return out

    return build


def _real_model(scratch: Path) -> Path:
    from benchmarks.real_model_fetch import real_model_dir

    found = real_model_dir()
    if found is None:
        raise FileNotFoundError("the real model is not fetched: make real-model")
    return found


ROWS = {
    "stories-gqa": Row("stories260K GQA 8q/4kv", lambda scratch: SHARED / "stories260K", TINYSTORIES, "GQA"),
    "stories-mqa": Row(
        "stories260K → MQA", _convert(SHARED / "stories260K", "--to", "mqa"), TINYSTORIES, "MQA"
    ),
    "stories-swa": Row(
        "stories260K → windows 64 ×4 + global",
        _convert(SHARED / "stories260K", "--to", "window", "--windows", "64,64,64,64,none"),
        TINYSTORIES,
        "GQA + sliding windows (granite_swa)",
        SHARED / "stories260K",  # its Qwen2-class export is tokenized as Qwen2 by transformers 5 (a bug)
    ),
    "stories-sinks": Row(
        "stories260K → windows 64 + sinks",
        _convert(
            SHARED / "stories260K",
            *("--to", "window", "--windows", "64,64,64,64,none", "--sinks"),
            *("--calib", str(SHARED / "corpora" / "botchan.txt"), "--calib-tokens", "1024"),
        ),
        TINYSTORIES,
        "GQA + windows + attention sinks (granite_swa)",
    ),
    "stories-mla": Row(
        "stories260K-mha → MLA 24+8",
        _convert(SHARED / "stories260K-mha", "--to", "mla", "--kv-lora-rank", "24", "--rope-dims", "8"),
        TINYSTORIES,
        "MLA (deepseek2, latent cache)",
    ),
    "smollm2": Row("SmolLM2-135M (real, Q4_1 import)", _real_model, WIKITEXT, "GQA 9q/3kv"),
    "qwen2": Row("tiny Qwen2 (random)", _tiny("qwen2"), None, "GQA + biases"),
    "qwen3": Row("tiny Qwen3 (random)", _tiny("qwen3"), None, "GQA + q/k norm"),
    "gemma2": Row(
        "tiny Gemma 2 (random)",
        _tiny("gemma2"),
        None,
        "GQA, windows 5 alternating, soft-caps",
        f32_tolerance=GELU_F16_TOLERANCE,
    ),
    "gemma3": Row(
        "tiny Gemma 3 (random)",
        _tiny("gemma3_text"),
        None,
        "GQA, windows 5, q/k norm",
        f32_tolerance=GELU_F16_TOLERANCE,
    ),
}


def token_ids(directory: Path, text: Path | None, n_tokens: int, vocab: int) -> list[int]:
    if text is None:
        return torch.randint(3, vocab, (n_tokens,), generator=torch.Generator().manual_seed(0)).tolist()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(directory)
    words = Path(text).read_text(encoding="utf-8")[: 40 * n_tokens]
    return tokenizer(words, add_special_tokens=False)["input_ids"][:n_tokens]


def log_probs(logits: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits.double(), dim=-1)


def perplexity(logp: torch.Tensor, ids: list[int]) -> float:
    targets = torch.tensor(ids[1:])
    return math.exp(-logp[:-1].gather(1, targets[:, None]).mean().item())


def kvforge_model(directory: Path) -> CausalLM:
    pretrained = load_pretrained(directory)
    model = CausalLM(pretrained.config).eval()
    model.load_state_dict(pretrained.state_dict)
    return model


def transformers_log_probs(directory: Path, ids: list[int]) -> torch.Tensor | None:
    """Stock transformers' log-probs, where a stock class holds the model (None for kvforge-typed ones)."""
    from transformers import AutoModelForCausalLM

    if json.loads((directory / "config.json").read_text()).get("model_type") == "kvforge":
        return None
    model = AutoModelForCausalLM.from_pretrained(
        directory, dtype=torch.float32, trust_remote_code=False
    ).eval()
    with torch.no_grad():
        return log_probs(model(torch.tensor([ids])).logits[0])


def greedy_kvforge(model: CausalLM, prompt: list[int], steps: int) -> list[int]:
    from kvforge.arch import generate

    return generate(model, torch.tensor([prompt]), steps)[0, len(prompt) :].tolist()


def greedy_llama(llm, prompt: list[int], steps: int) -> list[int]:
    """Argmax decoding through llama.cpp's own KV cache (no sampler in the way)."""
    llm.reset()
    llm.eval(prompt)
    out = []
    for _ in range(steps):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(token)
        llm.eval([token])
    return out


def open_llama(path: Path, n_ctx: int, cache_type: str = "f32"):
    """llama.cpp with its KV cache in ``cache_type`` (f32: no rounding of K/V; llama.cpp's default is f16)."""
    from llama_cpp import GGML_TYPE_F16, GGML_TYPE_F32, Llama

    threads = int(os.environ.get("OMP_NUM_THREADS", "2"))
    kind = {"f32": GGML_TYPE_F32, "f16": GGML_TYPE_F16}[cache_type]
    return Llama(
        model_path=str(path),
        n_ctx=n_ctx,
        logits_all=True,
        n_threads=threads,
        type_k=kind,
        type_v=kind,
        verbose=False,
    )


def measure(row: Row, outtype: str, scratch: Path, n_tokens: int, greedy: int) -> list[object]:
    directory = row.build(scratch)
    pretrained = load_pretrained(directory)
    gguf, _ = export_gguf(
        pretrained.config,
        pretrained.state_dict,
        scratch / f"{directory.name}-{outtype}.gguf",
        outtype=outtype,
        tokenizer_from=directory,
        overwrite=True,
    )
    ids = token_ids(row.tokenizer or directory, row.text, n_tokens, pretrained.config.vocab_size)
    model = kvforge_model(directory)
    with torch.no_grad():
        ours = log_probs(model(torch.tensor([ids]))[0])
    stock = transformers_log_probs(directory, ids)
    n_ctx = 256 * math.ceil((len(ids) + greedy + 1) / 256)
    llm = open_llama(gguf, n_ctx)
    llm.reset()
    llm.eval(ids)
    theirs = log_probs(torch.from_numpy(np.array(llm.scores[: len(ids)])))
    prompt = ids[:16]
    ours_greedy, theirs_greedy = greedy_kvforge(model, prompt, greedy), greedy_llama(llm, prompt, greedy)
    agree = next((i for i, (a, b) in enumerate(zip(ours_greedy, theirs_greedy)) if a != b), greedy)
    tokens_equal = "-"
    if row.text is not None:
        from transformers import AutoTokenizer

        words = Path(row.text).read_text(encoding="utf-8")[:2000]
        hf_tokenizer = AutoTokenizer.from_pretrained(row.tokenizer or directory)
        hf_ids = hf_tokenizer(words, add_special_tokens=False)["input_ids"]
        tokens_equal = "yes" if llm.tokenize(words.encode(), add_bos=False, special=False) == hf_ids else "NO"
    ppl_ours, ppl_theirs = perplexity(ours, ids), perplexity(theirs, ids)
    worst = (theirs - ours).abs().max().item()
    verdict = ("yes" if worst <= row.f32_tolerance else "NO") + f" (≤ {row.f32_tolerance:.0e})"
    return [
        row.name,
        row.form,
        outtype,
        f"{worst:.1e}",
        f"{(theirs - stock).abs().max().item():.1e}" if stock is not None else "-",
        f"{ppl_ours:.4f}",
        f"{ppl_theirs - ppl_ours:+.4f}",
        f"{agree}/{greedy}",
        tokens_equal,
        verdict if outtype == "f32" else "-",
    ]


COLUMNS = [
    "model",
    "form in llama.cpp",
    "outtype",
    "max |Δ log-prob| vs kvforge",
    "vs transformers",
    "ppl kvforge",
    "Δ ppl llama.cpp",
    "greedy equal",
    "tokenizer equal",
    "f32 within tolerance",
]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of {list(ROWS)}")
    parser.add_argument("--outtypes", default="f32,f16,q8_0")
    parser.add_argument("--tokens", type=int, default=256, help="evaluated slice length")
    parser.add_argument("--greedy", type=int, default=32, help="greedy tokens compared")
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="llama-cpp-parity-") as scratch:
        for key in args.rows.split(","):
            for outtype in args.outtypes.split(","):
                try:
                    rows.append(measure(ROWS[key], outtype, Path(scratch), args.tokens, args.greedy))
                except FileNotFoundError as err:
                    print(f"skipped {key}: {err}")
                    break
                except (ValueError, RuntimeError) as err:  # a row that fails is a row of the table
                    rows.append([ROWS[key].name, ROWS[key].form, outtype, f"FAILED: {err}", *["-"] * 6])
    print_table(
        f"llama.cpp (llama-cpp-python) vs kvforge on the same {args.tokens} tokens, CPU",
        COLUMNS,
        rows,
        markdown=args.markdown,
    )


if __name__ == "__main__":
    main()
