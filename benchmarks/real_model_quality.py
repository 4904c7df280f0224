"""Zero-shot conversion quality on a real pretrained checkpoint, with `kvforge convert`'s CLI defaults.

    python -m benchmarks.real_models quality [--rows mla-320,mqa] [--windows 64] [--src DIR] [--markdown]

Every row runs ``kvforge convert SRC OUT --to ...`` in a subprocess exactly as a user would (only the
form's own flags, every other option at its default), records the command's wall time, CPU time and peak RSS
(the interpreter, torch and the conversion; measured by :mod:`benchmarks.rusage`), then scores the output: mean
next-token loss on WikiText-2 test (``shared/data/corpora/wikitext2_test.txt``, the model's tokenizer,
no special tokens, one stream cut into non-overlapping windows of 512 tokens (2,048 for the rows that
change how far attention reaches), no BOS), the procedure of TARGETS.md. ``--windows N`` scores the
first N windows only (the whole text is ~600 windows of 512: about 20 min per row on 2 cores).

The KV column is the cache's bytes per token at the row's context in bf16 against the source's, a
constant-state layer's fixed state amortised over that context; ``state bytes/seq`` is that fixed
part alone (float32 recurrent states and convolution inputs: :func:`kvforge.arch.kv_bytes.state_bytes`).

Stock exports (Llama, DeepseekV3, ...) are reloaded with ``transformers.AutoModelForCausalLM`` and
scored on the first two windows beside kvforge: the ``stock |Δ|`` column is the difference of the two
losses there (the export computes what kvforge measured).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from benchmarks.common import markdown_table, print_table

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
WIKITEXT = DATA / "corpora" / "wikitext2_test.txt"


@dataclass
class Row:
    name: str
    flags: list[str]
    target: float | None = None  # Δ loss target (TARGETS.md / issue 26)
    context: int = 512
    note: str = ""
    extra: list[str] = field(default_factory=list)


ROWS = [
    Row(
        "mla-320",
        ["--to", "mla", "--kv-lora-rank", "320", "--rope-dims", "64"],
        0.05,
        note="the source's KV budget",
    ),
    Row(
        "mla-128",
        ["--to", "mla", "--kv-lora-rank", "128", "--rope-dims", "64"],
        0.35,
        note="half the source's",
    ),
    Row(
        "mla-32",
        ["--to", "mla", "--kv-lora-rank", "32", "--rope-dims", "64"],
        note="the DeltaNet 3:1 hybrid's cache at 8k",
    ),
    Row("mqa", ["--to", "mqa"], 0.70),
    Row("cla-2", ["--to", "cla", "--factor", "2"], 0.70),
    Row("mqa-mean", ["--to", "gqa", "--n-kv-heads", "1", "--method", "mean"], note="GQA paper's mean-pool"),
    Row("gta", ["--to", "gta"]),
    Row("gla-3", ["--to", "gla", "--n-latent-heads", "3", "--kv-lora-rank", "192", "--rope-dims", "64"]),
    Row("window-512", ["--to", "window", "--windows", "512"], context=2048),
    Row("window-512-sinks", ["--to", "window", "--windows", "512", "--sinks"], context=2048),
    Row("chunked-512", ["--to", "chunked", "--chunk", "512", "--global-every", "4"], context=2048),
    # Constant-state hybrids (issue 29): 100 attention-transfer steps a layer, not the CLI's 300, which
    # cost over an hour per conversion on 2 shared CPU cores at this size (docs/constant_state.md).
    Row("deltanet-3:1", ["--to", "deltanet", "--transfer-steps", "100"], note="7 of 30 layers kept (ends)"),
    Row("linear-3:1", ["--to", "linear", "--transfer-steps", "100"], note="Hedgehog + window 64, 7 kept"),
    Row("deltanet-1:1", ["--to", "deltanet", "--ratio", "1", "--transfer-steps", "100"], note="15 kept"),
    Row("linear-1:1", ["--to", "linear", "--ratio", "1", "--transfer-steps", "100"], note="15 kept"),
]


def kvforge_command() -> list[str]:
    script = Path(sys.executable).with_name("kvforge")
    return [str(script)] if script.exists() else [sys.executable, "-m", "kvforge.cli"]


def run_measured(command: list[str], log: Path) -> tuple[int, float, float, float]:
    """``(returncode, wall seconds, CPU seconds, peak RSS GiB)`` of one command: its own rusage, taken by
    :mod:`benchmarks.rusage` so that this process's memory (it holds the models it scores) is not
    counted. CPU time (user + system) is what the command costs on shared cores, where the wall time
    also counts the other jobs; on idle cores the wall time is about CPU time / threads used."""
    result = log.with_suffix(".rusage.json")
    start = time.perf_counter()
    with open(log, "w") as out:
        launcher = [sys.executable, "-m", "benchmarks.rusage", str(result), "--", *command]
        code = subprocess.run(launcher, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT).returncode
    wall = time.perf_counter() - start
    usage = json.loads(result.read_text()) if result.is_file() else {"cpu_s": 0.0, "peak_rss_gib": 0.0}
    return code, wall, usage["cpu_s"], usage["peak_rss_gib"]


def wikitext_ids(source: Path) -> torch.Tensor:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source)
    text = WIKITEXT.read_text(encoding="utf-8")
    return torch.tensor(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])


def first_windows(ids: torch.Tensor, context: int, windows: int | None) -> torch.Tensor:
    return ids if not windows else ids[: windows * context + 1]


def kvforge_loss(directory: Path, ids: torch.Tensor, context: int) -> tuple[float, object]:
    from kvforge.arch import CausalLM
    from kvforge.arch.evaluate import windowed_nll
    from kvforge.conversion import load_pretrained

    loaded = load_pretrained(directory)
    model = CausalLM(loaded.config).eval()
    model.load_state_dict(loaded.state_dict)
    return windowed_nll(model, ids, window=context, batch_size=4).mean, loaded.config


def stock_loss(directory: Path, ids: torch.Tensor, context: int) -> float | None:
    """Loss of the export in stock transformers on ``ids``, or None when it is kvforge-typed."""
    from transformers import AutoModelForCausalLM

    if json.loads((directory / "config.json").read_text()).get("model_type") == "kvforge":
        return None  # no stock class; AutoConfig would ask for trust_remote_code
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, ids.numel() - 1, context):
            window = ids[start : start + context + 1]
            logits = model(window[:-1].unsqueeze(0)).logits[0]
            total += float(torch.nn.functional.cross_entropy(logits, window[1:], reduction="sum"))
            count += window.numel() - 1
    return total / count


def main(argv: list[str] | None = None, source: Path | None = None) -> int:
    import argparse

    from kvforge.arch import kv_bytes_per_token
    from kvforge.arch.kv_bytes import state_bytes

    parser = argparse.ArgumentParser(prog="python -m benchmarks.real_models quality", description=__doc__)
    parser.add_argument(
        "--src", type=Path, default=source, help="model directory (default: the fetched real model)"
    )
    parser.add_argument("--rows", help=f"comma list of {[row.name for row in ROWS]} (default: all)")
    parser.add_argument("--windows", type=int, default=None, help="score the first N windows only")
    parser.add_argument("--keep", type=Path, help="keep the converted directories here")
    parser.add_argument("--json", type=Path, help="append one JSON line per row to this file")
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args(argv)
    if args.src is None:
        parser.error(
            "no --src and the real model is not fetched: run `python -m benchmarks.real_models fetch`"
        )
    wanted = set(args.rows.split(",")) if args.rows else None
    rows = [row for row in ROWS if wanted is None or row.name in wanted]
    unknown = (wanted or set()) - {row.name for row in ROWS}
    if unknown:
        parser.error(f"unknown rows {sorted(unknown)}; known: {[row.name for row in ROWS]}")

    ids = wikitext_ids(args.src)
    sources: dict[int, tuple[float, object]] = {}
    columns = [
        "conversion",
        "KV bytes/tok vs source",
        "state bytes/seq",
        "loss",
        "Δ loss",
        "target",
        "stock |Δ|",
        "wall s",
        "CPU s",
        "peak RSS GiB",
        "exported as",
    ]
    table = []
    with tempfile.TemporaryDirectory(prefix="real-quality-") as tmp:
        for row in rows:
            eval_ids = first_windows(ids, row.context, args.windows)
            if row.context not in sources:
                sources[row.context] = kvforge_loss(args.src, eval_ids, row.context)
            base, base_config = sources[row.context]
            out = (args.keep or Path(tmp)) / row.name
            command = [*kvforge_command(), "convert", str(args.src), str(out), *row.flags, "--overwrite"]
            code, wall, cpu, peak = run_measured(command, Path(tmp) / f"{row.name}.log")
            if code != 0:
                print((Path(tmp) / f"{row.name}.log").read_text()[-2000:], file=sys.stderr)
                table.append(
                    [
                        row.name,
                        "",
                        "",
                        "failed",
                        "",
                        "",
                        "",
                        f"{wall:.0f}",
                        f"{cpu:.0f}",
                        f"{peak:.2f}",
                        f"exit {code}",
                    ]
                )
                continue
            loss, config = kvforge_loss(out, eval_ids, row.context)
            stock = stock_loss(out, eval_ids[: 2 * row.context + 1], row.context)
            mine = (
                kvforge_loss(out, eval_ids[: 2 * row.context + 1], row.context)[0]
                if stock is not None
                else None
            )
            architecture = json.loads((out / "config.json").read_text()).get("architectures", ["?"])[0]
            ratio = kv_bytes_per_token(config, row.context, "bf16") / kv_bytes_per_token(
                base_config, row.context, "bf16"
            )
            delta = loss - base
            met = (
                ""
                if row.target is None
                else f"≤ +{row.target:.2f} {'met' if delta <= row.target else 'MISSED'}"
            )
            table.append(
                [
                    row.name + (f" @{row.context}" if row.context != 512 else ""),
                    f"{ratio:.3f}",
                    f"{state_bytes(config, 'bf16'):,}",
                    f"{loss:.4f}",
                    f"{delta:+.4f}",
                    met,
                    "" if stock is None else f"{abs(stock - mine):.1e}",
                    f"{wall:.0f}",
                    f"{cpu:.0f}",
                    f"{peak:.2f}",
                    architecture,
                ]
            )
            print(" | ".join(table[-1]), flush=True)
            if args.json:
                record = dict(
                    zip(columns, table[-1]), source_loss=base, windows=args.windows, flags=row.flags
                )
                with open(args.json, "a") as handle:
                    handle.write(json.dumps(record) + "\n")
    scored = f"first {args.windows} windows" if args.windows else "the whole text"
    print_table(f"Zero-shot, CLI defaults: {args.src.name}, WikiText-2 test ({scored})", columns, table)
    if args.markdown:
        print(markdown_table(columns, table))
    return 0
