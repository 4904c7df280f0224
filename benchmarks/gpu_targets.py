"""The targets of shared/GPU.md and TARGETS.md, checked against one run's results."""

from __future__ import annotations

TRAIN_VS_COMPILE = 1.15  # × transformers + torch.compile tokens/s, 1.1 B Llama shape
DECODE_VS_STOCK = 10.0  # × transformers tokens/s at batch 32, context 4096 (GQA and MLA)
DECODE_HBM_FRACTION = 0.40  # of the HBM bound at batch 32, context 4096
AUTO_SLACK = 1.05  # auto within 5 % of the best backend of each shape


def _ok(rows: list[dict]) -> list[dict]:
    return [row for row in rows if row.get("status") == "ok"]


def _verdict(target: str, measured: str, passed: bool | None) -> dict:
    status = "not measured" if passed is None else ("pass" if passed else "FAIL")
    return {"target": target, "measured": measured, "status": status}


def _training(results: dict) -> list[dict]:
    rows = _ok(results.get("training", []))
    ours = [r.get("vs_transformers_compile") for r in rows if r["impl"] == "kvforge" and r["form"] == "gqa"]
    ours = [ratio for ratio in ours if ratio is not None]
    target = f"training ≥ {TRAIN_VS_COMPILE}× transformers + torch.compile (GQA, 1.1 B shape)"
    if not ours:
        return [_verdict(target, "—", None)]
    return [_verdict(target, f"{max(ours):.2f}×", max(ours) >= TRAIN_VS_COMPILE)]


def _decode(results: dict) -> list[dict]:
    rows = _ok(results.get("decode", []))
    verdicts = []
    for form in ("gqa", "mla"):
        at = [
            r
            for r in rows
            if r["impl"] == "kvforge" and r["form"] == form and r["batch"] == 32 and r["context"] == 4096
        ]
        speedup = at[0].get("vs_transformers") if at else None
        verdicts.append(
            _verdict(
                f"decode {form} batch 32 / context 4096 ≥ {DECODE_VS_STOCK:.0f}× transformers",
                "—" if speedup is None else f"{speedup:.1f}×",
                None if speedup is None else speedup >= DECODE_VS_STOCK,
            )
        )
        fraction = at[0]["hbm_fraction"] if at else None
        verdicts.append(
            _verdict(
                f"decode {form} batch 32 / context 4096 ≥ {DECODE_HBM_FRACTION:.0%} of the HBM bound",
                "—" if fraction is None else f"{fraction:.0%}",
                None if fraction is None else fraction >= DECODE_HBM_FRACTION,
            )
        )
    ours = {(r["form"], r["context"], r["batch"]): r for r in rows if r["impl"] == "kvforge"}
    pairs = [
        (mla, ours[("gqa", context, batch)])
        for (form, context, batch), mla in ours.items()
        if form == "mla"
        and ("gqa", context, batch) in ours
        and mla["kv_bytes"] < ours[("gqa", context, batch)]["kv_bytes"]
    ]
    faster = sum(mla["tokens_per_s"] > gqa["tokens_per_s"] for mla, gqa in pairs)
    verdicts.append(
        _verdict(
            "MLA decodes faster than GQA wherever its cache is smaller",
            f"{faster}/{len(pairs)} (context, batch) points",
            None if not pairs else faster == len(pairs),
        )
    )
    return verdicts


def _auto(results: dict) -> list[dict]:
    rows = [r for r in _ok(results.get("attention", [])) if r["backend"] == "auto" and "vs_best" in r]
    target = f"auto within {AUTO_SLACK - 1:.0%} of the best backend of every shape"
    if not rows:
        return [_verdict(target, "—", None)]
    worst = max(rows, key=lambda r: r["vs_best"])
    within = sum(r["vs_best"] <= AUTO_SLACK for r in rows)
    measured = (
        f"{within}/{len(rows)} shapes; worst {worst['vs_best']:.2f}× ({worst['form']} @ {worst['context']})"
    )
    return [_verdict(target, measured, within == len(rows))]


def check_targets(results: dict, smoke: bool = False) -> list[dict]:
    verdicts = _training(results) + _decode(results) + _auto(results)
    if smoke:  # the code paths ran; tiny CPU shapes say nothing about GPU targets
        for verdict in verdicts:
            verdict["status"] = "smoke run: not judged"
    return verdicts
