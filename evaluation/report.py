"""The evaluation report: a JSON file whose every field is documented (``kvforge eval --schema``),
and rich tables on the terminal."""

from __future__ import annotations

import dataclasses
import datetime
import json
import platform
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from kvforge.conversion import atomic_file
from kvforge.evaluation.schema import documented

from .runner import EvalSettings, ModelReport

FORMAT_VERSION = 2  # 2: KV figures at `kv_context` in `kv_dtype` (1: at max_seq_len)


@dataclass
class Environment:
    kvforge: str = documented("kvforge version")
    torch: str = documented("torch version")
    transformers: str = documented("transformers version")
    python: str = documented("Python version")
    device: str = documented("device the models ran on")
    device_name: str = documented("GPU name, or the CPU architecture")
    threads: int = documented("torch intra-op threads")


@dataclass
class EvalReport:
    format_version: int = documented("version of this JSON layout")
    created: str = documented("UTC time the report was written, ISO 8601")
    environment: Environment = documented("software and hardware the numbers were measured on")
    settings: EvalSettings = documented("the evaluation settings every model was run with")
    models: list[ModelReport] = documented("one entry per evaluated model")
    plots: dict[str, str] = documented("PNG files written next to the JSON, by plot name")


def environment(device: torch.device) -> Environment:
    return Environment(
        kvforge=metadata.version("kvforge"),
        torch=torch.__version__,
        transformers=metadata.version("transformers"),
        python=platform.python_version(),
        device=str(device),
        device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else platform.machine(),
        threads=torch.get_num_threads(),
    )


def new_report(settings: EvalSettings, models: list[ModelReport], device: torch.device) -> EvalReport:
    created = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    return EvalReport(FORMAT_VERSION, created, environment(device), settings, models, {})


def write_json(report: EvalReport, path: str | Path) -> Path:
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(dataclasses.asdict(report), indent=2) + "\n")
    return Path(path)


def _table(title: str, columns: list[str], rows: list[list[str]]) -> Table:
    table = Table(title=title)
    for index, column in enumerate(columns):
        table.add_column(column, justify="left" if index == 0 else "right")
    for row in rows:
        table.add_row(*row)
    return table


def summary_rows(models: list[ModelReport]) -> list[list[str]]:
    rows = []
    for m in models:
        ppl = m.perplexity[0] if m.perplexity else None
        longest = max(m.latency, key=lambda r: (r.context, -r.batch), default=None)
        rows.append(
            [
                m.name,
                f"{m.n_parameters:,}",
                f"{m.kv_bytes_per_token:,.0f} ({m.kv_context}, {m.kv_dtype})",
                f"{m.kv_ratio_vs_mha:.3f}",
                f"{ppl.nll:.4f} ({ppl.context})" if ppl else "-",
                f"{m.passkey.accuracy:.2f}" if m.passkey else "-",
                f"{longest.decode_tokens_per_s:,.0f} (b{longest.batch}, {longest.context})"
                if longest
                else "-",
            ]
        )
    return rows


def print_report(report: EvalReport, console: Console | None = None) -> None:
    # Piped output (a log, a README) gets wide tables instead of rich's 80-column default.
    console = console or Console(width=None if sys.stdout.isatty() else 150)
    models = report.models
    console.print(
        _table(
            "kvforge eval",
            [
                "model",
                "params",
                "KV bytes/token (context, dtype)",
                "vs MHA",
                "NLL (context)",
                "passkey acc",
                "decode tok/s",
            ],
            summary_rows(models),
        )
    )
    for m in models:
        if m.perplexity:
            console.print(
                _table(
                    f"{m.name}: perplexity",
                    ["corpus", "context", "stride", "tokens", "NLL", "perplexity"],
                    [
                        [
                            r.corpus,
                            str(r.context),
                            str(r.stride),
                            f"{r.n_tokens:,}",
                            f"{r.nll:.4f}",
                            f"{r.perplexity:.3f}",
                        ]
                        for r in m.perplexity
                    ],
                )
            )
        if m.perplexity_vs_context:
            console.print(
                _table(
                    f"{m.name}: NLL versus context ({m.perplexity_vs_context[0].corpus})",
                    ["context", *(str(r.context) for r in m.perplexity_vs_context)],
                    [["NLL", *(f"{r.nll:.4f}" for r in m.perplexity_vs_context)]],
                )
            )
        for title, task in (
            ("passkey", m.passkey),
            (f"{m.needles.settings.n_keys}-key needle" if m.needles else "", m.needles),
        ):
            if task is None:
                continue
            console.print(
                _table(
                    f"{m.name}: {title} exact-match accuracy ({task.settings.trials} prompts per cell)",
                    ["context \\ depth", *(f"{d:g}" for d in task.settings.depths)],
                    [
                        [str(c), *(f"{cell.accuracy:.2f}" for cell in task.cells if cell.context == c)]
                        for c in task.settings.contexts
                    ],
                )
            )
        if m.latency:
            console.print(
                _table(
                    f"{m.name}: KV cache and speed",
                    [
                        "batch",
                        "context",
                        "KV bytes measured",
                        "= analytic",
                        "bytes/token",
                        "prefill tok/s",
                        "decode ms/step",
                        "decode tok/s",
                    ],
                    [
                        [
                            str(lat.batch),
                            str(lat.context),
                            f"{mem.measured_cache_bytes:,}",
                            "yes" if mem.matches_analytic else f"NO ({mem.analytic_cache_bytes:,})",
                            f"{mem.measured_bytes_per_token:,.0f}",
                            f"{lat.prefill_tokens_per_s:,.0f}",
                            f"{lat.decode_ms_per_step:.2f}",
                            f"{lat.decode_tokens_per_s:,.0f}",
                        ]
                        for lat, mem in zip(m.latency, m.memory)
                    ],
                )
            )
