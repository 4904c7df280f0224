"""The KV study's tables and plots, from its results (``{row: {measurement: value}}``)."""

from __future__ import annotations

from pathlib import Path

from benchmarks.kv_study_rows import ROWS, TARGET_INCREASE_PERCENT
from kvforge.evaluation.plots import plot_decode_by_row, plot_quality_vs_bytes, plot_uptraining

Results = dict[str, dict[str, float | None]]


def _cell(value: float | None, fmt: str) -> str:
    return "–" if value is None else format(value, fmt)


def _ratio(value: float | None, baseline: float | None) -> float | None:
    return value / baseline if value is not None and baseline else None


def table(results: Results, mha_bytes: float) -> tuple[list[str], list[list[object]]]:
    columns = [
        "row",
        "built by",
        "KV bytes/token",
        "vs MHA",
        "zero-shot NLL",
        "held-out NLL",
        "uptrained CE",
        "uptrained distill",
        "decode tok/s",
        "decode vs MHA",
    ]
    baseline = results.get("mha", {}).get("decode_tokens_per_s")
    rows = []
    for name, values in results.items():
        speed = values["decode_tokens_per_s"]
        speed_ratio = _ratio(speed, baseline)
        rows.append(
            [
                name,
                ROWS[name].built_by,
                _cell(values["kv_bytes_per_token"], ",.0f"),
                _cell(_ratio(values["kv_bytes_per_token"], mha_bytes), ".3f"),
                _cell(values["zero_shot_nll"], ".4f"),
                _cell(values["heldout_nll"], ".4f"),
                _cell(values["uptrained_ce_nll"], ".4f"),
                _cell(values["uptrained_distill_nll"], ".4f"),
                _cell(speed, ",.0f"),
                _cell(speed_ratio, ".2f") + ("×" if speed_ratio is not None else ""),
            ]
        )
    return columns, rows


def recovery_table(results: Results, source_nll: float) -> tuple[list[str], list[list[object]]]:
    """Uptrained rows against the source's held-out loss and TARGETS.md's recovery targets."""
    columns = ["row", "zero-shot", "CE", "distill", "best vs source", "target", "met"]

    def percent(value: float | None) -> str:
        return "–" if value is None else f"{100 * (value / source_nll - 1):+.1f} %"

    rows = []
    for name, values in results.items():
        if not ROWS[name].uptrain or values["uptrained_distill_nll"] is None:
            continue
        trained = [v for v in (values["uptrained_ce_nll"], values["uptrained_distill_nll"]) if v is not None]
        best = min(trained)
        target = TARGET_INCREASE_PERCENT.get(name)
        met = "–" if target is None else ("yes" if best <= source_nll * (1 + target / 100) else "no")
        rows.append(
            [
                name,
                f"{_cell(values['heldout_nll'], '.4f')} ({percent(values['heldout_nll'])})",
                f"{_cell(values['uptrained_ce_nll'], '.4f')} ({percent(values['uptrained_ce_nll'])})",
                f"{values['uptrained_distill_nll']:.4f} ({percent(values['uptrained_distill_nll'])})",
                percent(best),
                "–" if target is None else f"≤ +{target:.1f} % ({source_nll * (1 + target / 100):.4f})",
                met,
            ]
        )
    return columns, rows


def write_plots(results: Results, out: Path, corpus: str) -> list[Path]:
    """pareto.png compares uptrained rows only (the same budget for all, the source's own control
    included when measured): a zero-shot point next to them would mix two procedures."""
    done = {n: v for n, v in results.items() if v["heldout_nll"] is not None}
    trained = {n: v for n, v in done.items() if v["uptrained_distill_nll"] is not None}
    paths = []
    if trained:
        final = [(n, v["kv_bytes_per_token"], v["uptrained_distill_nll"]) for n, v in trained.items()]
        label = f"{corpus}[80%:] NLL, distilled"
        paths.append(plot_quality_vs_bytes(final, out / "pareto.png", label))
        paths.append(
            plot_uptraining(
                {
                    n: (v["heldout_nll"], v["uptrained_ce_nll"], v["uptrained_distill_nll"])
                    for n, v in trained.items()
                },
                done["mha"]["heldout_nll"] if "mha" in done else None,
                out / "uptraining.png",
            )
        )
    speeds = {n: (v["kv_bytes_per_token"], v["decode_tokens_per_s"]) for n, v in done.items()}
    paths.append(plot_decode_by_row(speeds, out / "decode_speed.png"))
    return paths
