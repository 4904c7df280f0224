"""Helpers shared by the benchmark scripts: timing with warm-up, median of repeats, table printing."""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable

import torch
from rich.console import Console
from rich.table import Table


def timed(fn: Callable[[], object], repeats: int = 5, warmup: int = 1) -> float:
    """Median wall-clock seconds of ``fn()`` over ``repeats`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def print_table(title: str, columns: list[str], rows: list[list[object]], markdown: bool = False) -> None:
    """A rich table on the terminal; with ``markdown`` the same rows again as a Markdown table (for docs)."""
    table = Table(title=title)
    for column in columns:
        table.add_column(column, justify="right" if column != columns[0] else "left")
    for row in rows:
        table.add_row(*(f"{cell:,.2f}" if isinstance(cell, float) else str(cell) for cell in row))
    # Piped into a log or a README: wide enough for every column instead of rich's 80-column default.
    Console(width=None if sys.stdout.isatty() else 160).print(table)
    if markdown:
        print(markdown_table(columns, rows))


def markdown_table(columns: list[str], rows: list[list[object]]) -> str:
    def fmt(cell: object) -> str:
        return f"{cell:,.2f}" if isinstance(cell, float) else str(cell)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
