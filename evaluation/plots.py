"""PNG plots of an evaluation. Figures are built with matplotlib's object API (``Figure`` renders
through Agg when saved), so no display is needed and the caller's pyplot backend is left alone.

- ``pareto.png``: quality (NLL) against KV bytes per token, the trade-off a user picks a form by;
  the frontier joins the models no other model beats on both axes.
- ``nll_vs_context.png``: NLL against context length, where windowed or compressed forms depart.
- ``decode_speed.png``: decode tokens/s against context length, per model and batch size.
- ``retrieval.png``: passkey accuracy heat map (context length x needle depth), one panel per model.

The KV study (``benchmarks/kv_study.py``) adds, per study row: ``uptraining.png`` (held-out NLL as
converted, after CE-only and after distilled uptraining) and ``decode_speed.png`` (a bar per row).
``benchmarks/real_uptrain.py`` adds ``real_pareto.png`` (``plot_recovery_vs_bytes``): each conversion as
converted and after the budget, against the source and the source put through the same budget.
"""

from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure

from kvforge.conversion import atomic_file

from .runner import ModelReport


def _save(figure, path: Path) -> Path:
    with atomic_file(path) as tmp:
        figure.savefig(tmp, format="png", dpi=120)
    return path


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Points (bytes, nll) that no other point beats on both axes, sorted by bytes."""
    front, best = [], float("inf")
    for x, y in sorted(points):
        if y < best:
            front.append((x, y))
            best = y
    return front


def plot_quality_vs_bytes(points: list[tuple[str, float, float]], path: Path, quality_label: str) -> Path:
    """Scatter of ``(name, kv_bytes_per_token, nll)`` points with their Pareto front."""
    figure = Figure(figsize=(6, 4.5), layout="constrained")
    axes = figure.subplots()
    axes.scatter([p[1] for p in points], [p[2] for p in points], zorder=3)
    for name, x, y in points:
        axes.annotate(name, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
    front = pareto_front([(x, y) for _, x, y in points])
    axes.step(
        [p[0] for p in front],
        [p[1] for p in front],
        where="post",
        color="tab:red",
        alpha=0.6,
        label="Pareto front",
    )
    axes.set_xlabel("KV cache bytes per token (all layers)")
    axes.set_ylabel(quality_label)
    axes.set_title("Quality versus KV-cache size")
    axes.grid(alpha=0.3)
    axes.legend()
    return _save(figure, path)


def plot_recovery_vs_bytes(
    rows: dict[str, tuple[float, float, float]],
    source: tuple[float, float],
    control: float | None,
    path: Path,
    quality_label: str,
) -> Path:
    """Loss against KV bytes per token: each row ``name -> (bytes, as converted, after the budget)`` as an
    arrow from the zero-shot point to the uptrained one; ``source`` ``(bytes, loss)`` as a star and the
    source after the same budget (``control``) as a dashed line."""
    figure = Figure(figsize=(6.5, 4.5), layout="constrained")
    axes = figure.subplots()
    xs = [r[0] for r in rows.values()]
    axes.scatter(xs, [r[1] for r in rows.values()], marker="o", facecolors="none", edgecolors="tab:gray")
    axes.scatter(xs, [r[2] for r in rows.values()], marker="o", color="tab:blue", zorder=3)
    for name, (x, zero, trained) in rows.items():
        axes.annotate("", (x, trained), (x, zero), arrowprops={"arrowstyle": "->", "color": "tab:blue"})
        axes.annotate(name, (x, trained), textcoords="offset points", xytext=(5, -10), fontsize=8)
    axes.scatter([source[0]], [source[1]], marker="*", s=120, color="black", zorder=3)
    axes.annotate("source", source, textcoords="offset points", xytext=(-10, 8), fontsize=8)
    if control is not None:
        axes.axhline(control, color="tab:red", linestyle="--", linewidth=1)
    axes.plot([], [], "o", mfc="none", mec="tab:gray", label="as converted (zero-shot)")
    axes.plot([], [], "o", color="tab:blue", label="after the uptraining budget")
    if control is not None:
        axes.plot([], [], "--", color="tab:red", label=f"source after the same budget ({control:.3f})")
    axes.set_xlabel("KV cache bytes per token (all layers, bf16)")
    axes.set_ylabel(quality_label)
    axes.set_title("Recovery under a fixed uptraining budget")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    return _save(figure, path)


def plot_pareto(models: list[ModelReport], path: Path) -> Path | None:
    points = [(m.name, m.kv_bytes_per_token, m.perplexity[0].nll) for m in models if m.perplexity]
    if not points:
        return None
    first = next(m.perplexity[0] for m in models if m.perplexity)
    return plot_quality_vs_bytes(points, path, f"NLL, nats/token ({first.corpus}, context {first.context})")


def plot_nll_vs_context(models: list[ModelReport], path: Path) -> Path | None:
    curves = [m for m in models if m.perplexity_vs_context]
    if not curves:
        return None
    figure = Figure(figsize=(6, 4.5), layout="constrained")
    axes = figure.subplots()
    for m in curves:
        rows = m.perplexity_vs_context
        axes.plot([r.context for r in rows], [r.nll for r in rows], marker="o", label=m.name)
    axes.set_xscale("log", base=2)
    axes.set_xlabel("context length (tokens)")
    axes.set_ylabel(f"NLL, nats/token ({curves[0].perplexity_vs_context[0].corpus})")
    axes.set_title("Quality versus context length")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    return _save(figure, path)


def plot_decode_speed(models: list[ModelReport], path: Path) -> Path | None:
    if not any(m.latency for m in models):
        return None
    figure = Figure(figsize=(6, 4.5), layout="constrained")
    axes = figure.subplots()
    for m in models:
        for batch in sorted({r.batch for r in m.latency}):
            rows = [r for r in m.latency if r.batch == batch]
            axes.plot(
                [r.context for r in rows],
                [r.decode_tokens_per_s for r in rows],
                marker="o",
                label=f"{m.name}, batch {batch}",
            )
    axes.set_xscale("log", base=2)
    axes.set_xlabel("tokens in the KV cache")
    axes.set_ylabel("decode tokens/s")
    axes.set_title("Decode speed versus context length")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    return _save(figure, path)


def plot_retrieval(models: list[ModelReport], path: Path) -> Path | None:
    panels = [m for m in models if m.passkey]
    if not panels:
        return None
    figure = Figure(figsize=(4.2 * len(panels), 3.8), layout="constrained")
    axes_list = figure.subplots(1, len(panels), squeeze=False)
    for axes, m in zip(axes_list[0], panels):
        contexts, depths = m.passkey.settings.contexts, m.passkey.settings.depths
        grid = [
            [next(c.accuracy for c in m.passkey.cells if c.context == ctx and c.depth == d) for d in depths]
            for ctx in contexts
        ]
        image = axes.imshow(grid, vmin=0.0, vmax=1.0, cmap="RdYlGn", aspect="auto", origin="lower")
        axes.set_xticks(range(len(depths)), [f"{d:g}" for d in depths])
        axes.set_yticks(range(len(contexts)), [str(c) for c in contexts])
        for row, values in enumerate(grid):
            for col, value in enumerate(values):
                axes.text(col, row, f"{value:.2f}", ha="center", va="center", fontsize=7)
        axes.set_xlabel("needle depth")
        axes.set_ylabel("context length")
        axes.set_title(f"{m.name}: passkey accuracy", fontsize=9)
    figure.colorbar(image, ax=list(axes_list[0]), shrink=0.8)
    return _save(figure, path)


def plot_uptraining(
    rows: dict[str, tuple[float | None, float | None, float | None]], source_nll: float | None, path: Path
) -> Path:
    """Grouped bars per row: held-out NLL ``(as converted, CE-only uptraining, distilled uptraining)``,
    on a log scale (zero-shot losses are several times the trained ones), the source as a line."""
    figure = Figure(figsize=(7, 4.5), layout="constrained")
    axes = figure.subplots()
    names = list(rows)
    width = 0.27
    for offset, (label, index) in enumerate((("as converted", 0), ("CE only", 1), ("distilled", 2))):
        xs = [i + (offset - 1) * width for i, name in enumerate(names) if rows[name][index] is not None]
        ys = [rows[name][index] for name in names if rows[name][index] is not None]
        axes.bar(xs, ys, width, label=label)
    if source_nll is not None:
        axes.axhline(source_nll, color="black", linestyle="--", linewidth=1, label=f"source {source_nll:.3f}")
    axes.set_yscale("log")
    axes.set_xticks(range(len(names)), names, rotation=20)
    axes.set_ylabel("held-out NLL, nats/token (log scale)")
    axes.set_title("Recovery under a fixed uptraining budget")
    axes.grid(alpha=0.3, axis="y")
    axes.legend(fontsize=8)
    return _save(figure, path)


def plot_decode_by_row(rows: dict[str, tuple[float, float | None]], path: Path) -> Path:
    """Decode tokens/s per row (bars), each labelled with its KV bytes per token."""
    figure = Figure(figsize=(7, 4.5), layout="constrained")
    axes = figure.subplots()
    measured = {name: value for name, value in rows.items() if value[1] is not None}
    bars = axes.bar(range(len(measured)), [speed for _, speed in measured.values()])
    for bar, (kv_bytes, _) in zip(bars, measured.values()):
        axes.annotate(
            f"{kv_bytes:,.0f} B",
            (bar.get_x() + bar.get_width() / 2, bar.get_height()),
            ha="center",
            va="bottom",
            fontsize=7,
        )
    axes.set_xticks(range(len(measured)), list(measured), rotation=20)
    axes.set_ylabel("decode tokens/s (batch 1, full context)")
    axes.set_title("Decode speed per form (labels: KV bytes/token)")
    axes.grid(alpha=0.3, axis="y")
    return _save(figure, path)


PLOTS = {
    "pareto": plot_pareto,
    "nll_vs_context": plot_nll_vs_context,
    "decode_speed": plot_decode_speed,
    "retrieval": plot_retrieval,
}


def write_plots(models: list[ModelReport], out_dir: str | Path) -> dict[str, str]:
    """Every plot the reports have data for, as ``{name: path}``."""
    out_dir = Path(out_dir)
    written = {}
    for name, plot in PLOTS.items():
        path = plot(models, out_dir / f"{name}.png")
        if path is not None:
            written[name] = str(path)
    return written
