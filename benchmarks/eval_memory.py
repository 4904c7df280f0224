"""Peak memory of ``kvforge eval`` on a large vocabulary: the chunked NLL against the old full logits.

    PYTHONPATH=. python -m benchmarks.eval_memory [--model-dir /tmp/kvforge-gemma3-270m-random]
        [--batch-size 8] [--old-batch-size 8] [--skip-old]

A random model of Gemma 3 270M's exact shape (the fields of its config.json: vocabulary 262,144, hidden
640, 18 layers of 4 query heads and one K/V head of 256 dims, 5 sliding (512) : 1 global, bf16 weights;
built once by transformers and kept in ``--model-dir``) is evaluated by ``kvforge eval`` with its default
flags (batch 8, fp32) at context 512: the perplexity and context tasks over 8 windows of 512 tokens of
tinystories_val_prefix.txt, tokenized by stories260K's tokenizer (the ids are valid in any vocabulary;
the memory does not depend on the text). Each run is its own process, whose peak resident memory
(``ru_maxrss``) it reports itself:

- ``chunked``: kvforge as it is (``arch.evaluate.windowed_nll`` through ``kernels.cross_entropy.token_nll``);
- ``full logits``: the same command with ``windowed_nll``'s scorer replaced by the old one (below), which
  built the batch's float32 logits and a log-softmax of the same size for ``F.cross_entropy``. Only the
  scorer is the old one: the model is loaded as kvforge loads it now (one tensor at a time, no random
  initialisation first), which alone took the load's own peak from 2.0 to 1.5 GiB on this model.

Both print the same NLL (the table shows it). The old path needs about 3 × batch × 512 × 262,144 × 4 bytes
beyond the model (14 GiB at batch 8): it is skipped, with the estimate, when the machine has less
available memory than that (``--old-batch-size`` runs it at a smaller batch instead).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.common import print_table
from benchmarks.source_tree import REPO

GIB = 2**30
CONTEXT = 512
N_WINDOWS = 8
SHARED = REPO.parent / "shared" / "data"
TEXT = SHARED / "corpora" / "tinystories_val_prefix.txt"
TOKENIZER = SHARED / "stories260K"

# Gemma 3 270M's config.json, weights aside (google/gemma-3-270m): data, kept as the JSON it is.
GEMMA3_270M = json.loads(Path(__file__).with_name("gemma3_270m_config.json").read_text())

# Runs in each child: optionally put back the old scorer, run `kvforge eval`, report the process's peak.
CHILD = """
import json, resource, sys
old = sys.argv[1] == "full-logits"
if old:
    import kvforge.arch.evaluate as evaluate
    from benchmarks.eval_memory import full_logits_score
    evaluate._score = full_logits_score
from kvforge.cli.main import main
code = main(sys.argv[2:])
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print("RESULT " + json.dumps({"code": code, "peak": peak}))
"""


def full_logits_score(model, ids, spans, window, n_targets, device) -> tuple[float, int]:
    """``windowed_nll``'s scorer before the chunked NLL: the whole batch's logits, then ``F.cross_entropy``."""
    import torch
    import torch.nn.functional as F

    total, counted = 0.0, 0
    lengths = {min(window, n_targets - start) for start, _ in spans}
    for length in lengths:
        rows = [(start, skip) for start, skip in spans if min(window, n_targets - start) == length]
        inputs = torch.stack([ids[s : s + length] for s, _ in rows]).to(device)
        targets = torch.stack([ids[s + 1 : s + 1 + length] for s, _ in rows]).to(device)
        logits = model(inputs).float()
        nll = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
        for row, (_, skip) in enumerate(rows):
            total += nll[row, skip:].sum().item()
            counted += length - skip
    return total, counted


def build_model(directory: Path) -> None:
    """A random Gemma 3 270M-shaped checkpoint in bf16, as the real one is stored."""
    if (directory / "config.json").is_file():
        return
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.Gemma3TextConfig(**GEMMA3_270M)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(directory)


def available_bytes() -> int:
    with open("/proc/meminfo") as meminfo:
        line = next(line for line in meminfo if line.startswith("MemAvailable"))
    return int(line.split()[1]) * 1024


def run_eval(path: str, model_dir: Path, batch_size: int, out: Path) -> dict:
    argv = [
        "eval", str(model_dir), "--text", str(TEXT), "--tokenizer", str(TOKENIZER),
        "--tasks", "perplexity,context", "--context", str(CONTEXT), "--contexts", str(CONTEXT),
        "--max-tokens", str(N_WINDOWS * CONTEXT + 1), "--batch-size", str(batch_size),
        "--out", str(out), "--overwrite", "--no-plots",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-c", CHILD, path, *argv], capture_output=True, text=True, env=env, cwd=REPO
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not lines:
        raise RuntimeError(f"{path} run failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    result = json.loads(lines[-1].removeprefix("RESULT "))
    report = json.loads((out / "eval.json").read_text())["models"][0]
    return {**result, "nll": report["perplexity"][0]["nll"], "params": report["n_parameters"]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", default="/tmp/kvforge-gemma3-270m-random")
    parser.add_argument("--batch-size", type=int, default=8, help="kvforge eval's default: 8")
    parser.add_argument(
        "--old-batch-size", type=int, help="batch of the full-logits run (default: --batch-size)"
    )
    parser.add_argument("--skip-old", action="store_true", help="measure the chunked path only")
    args = parser.parse_args(argv)
    model_dir = Path(args.model_dir)
    build_model(model_dir)
    old_batch = args.old_batch_size or args.batch_size
    logits_bytes = 3 * old_batch * CONTEXT * GEMMA3_270M["vocab_size"] * 4  # logits, log-softmax, a margin
    rows = []
    with tempfile.TemporaryDirectory() as work:
        new = run_eval("chunked", model_dir, args.batch_size, Path(work) / "new")
        rows.append(
            ["chunked NLL (kvforge now)", args.batch_size, f"{new['peak'] / GIB:.2f}", f"{new['nll']:.6f}"]
        )
        old = None
        if args.skip_old:
            pass
        elif available_bytes() < new["peak"] + logits_bytes:
            print(
                f"full-logits run skipped: it needs about {(new['peak'] + logits_bytes) / GIB:.1f} GiB, "
                f"{available_bytes() / GIB:.1f} GiB available (try --old-batch-size 1)"
            )
        else:
            old = run_eval("full-logits", model_dir, old_batch, Path(work) / "old")
            rows.append(["full logits (before)", old_batch, f"{old['peak'] / GIB:.2f}", f"{old['nll']:.6f}"])
    print_table(
        f"kvforge eval peak RSS: random Gemma 3 270M shape ({new['params']:,} parameters, vocab 262,144), "
        f"context {CONTEXT}, {N_WINDOWS} windows, fp32",
        ["scorer", "batch", "peak RSS (GiB)", "NLL (nats/token)"],
        rows,
    )
    if old is not None:
        print(
            f"peak ratio full logits / chunked: {old['peak'] / new['peak']:.2f}x; NLL difference {abs(old['nll'] - new['nll']):.2e}"
        )
    print(
        f"target: chunked peak <= 2 GB: {'met' if new['peak'] <= 2e9 else 'NOT met'} ({new['peak'] / 1e9:.2f} GB)"
    )


if __name__ == "__main__":
    main()
