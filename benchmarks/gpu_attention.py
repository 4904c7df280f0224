"""Attention kernels alone: forward and forward+backward TFLOP/s per backend and form at each context,
``auto`` against the best backend of each shape, and one-token decode bandwidth over a static cache.
Also turns the measurements into ``kernels/backend_table.json`` rows (``--write-table``)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from benchmarks.common import timed
from kvforge.kernels.attention import BackendUnavailable, attention, available_backends, resolve_backend

TOKENS_PER_BATCH = 16384  # B·T held constant across contexts, as GPU.md's B=4 × T=4096


@dataclass(frozen=True)
class AttentionForm:
    name: str
    case: str  # the backend_table.json case it measures
    n_heads: int
    n_kv_heads: int
    head_dim: int
    v_dim: int
    window: int | None = None
    documents: int = 0  # packed documents per row (0 = one sequence)
    decode: bool = False  # one query token over a static cache of the context's length


def attention_forms(smoke: bool) -> list[AttentionForm]:
    d = 16 if smoke else 128  # GPU.md's attention table: 32 q / 8 kv heads of d=128
    window = 16 if smoke else 1024
    latent, rope = (32, 8) if smoke else (512, 64)
    return [
        AttentionForm("gqa", "causal", 32, 8, d, d),
        AttentionForm("mqa", "causal", 32, 1, d, d),
        AttentionForm("mha", "causal", 32, 32, d, d),
        AttentionForm("mla-expanded", "causal", 16, 16, d + d // 2, d),  # MLA training: nope+rope keys
        AttentionForm("swa", "window", 32, 8, d, d, window=window),
        AttentionForm("documents", "documents", 32, 8, d, d, documents=8),
        AttentionForm("gqa-decode", "decode", 32, 8, d // 2, d // 2, decode=True),  # the 1.1B model's d=64
        AttentionForm("mla-decode", "decode", 16, 1, latent + rope, latent, decode=True),  # absorbed
    ]


def visible_pairs(form: AttentionForm, seq: int) -> int:
    """(query, key) pairs the mask lets through, per batch row and head: FLOPs are 2·(dk+dv)·pairs."""
    if form.decode:
        return seq
    if form.documents:
        length = seq // form.documents
        return form.documents * length * (length + 1) // 2
    if form.window is not None:
        w = min(form.window, seq)
        return w * (w + 1) // 2 + (seq - w) * w
    return seq * (seq + 1) // 2


def _inputs(form: AttentionForm, seq: int, batch: int, device, dtype, grad: bool):
    q_len = 1 if form.decode else seq
    slots = seq + 64 if form.decode else seq  # a static buffer is longer than what is filled
    q = torch.randn(batch, q_len, form.n_heads, form.head_dim, device=device, dtype=dtype, requires_grad=grad)
    if form.name == "mla-decode":  # V is the leading columns of the cached latent row
        latent = torch.randn(batch, slots, form.head_dim, device=device, dtype=dtype)
        k, v = latent.unsqueeze(2), latent[..., : form.v_dim].unsqueeze(2)
    else:
        k = torch.randn(
            batch, slots, form.n_kv_heads, form.head_dim, device=device, dtype=dtype, requires_grad=grad
        )
        v = torch.randn(
            batch, slots, form.n_kv_heads, form.v_dim, device=device, dtype=dtype, requires_grad=grad
        )
    kwargs = dict(window=form.window)
    if form.documents:
        length = seq // form.documents
        ids = torch.arange(seq, device=device).clamp(max=length * form.documents - 1) // length
        kwargs["document_ids"] = ids.expand(batch, seq)
    if form.decode:
        kwargs["kv_lens"] = torch.full((1,), seq, device=device)
    return q, k, v, kwargs


def measure_attention(
    smoke: bool,
    contexts: list[int],
    backends: list[str],
    device,
    dtype,
    repeats: int,
    forms: list[str] | None,
) -> list[dict]:
    rows = []
    for form in attention_forms(smoke):
        if forms and form.name not in forms:
            continue
        for seq in contexts:
            batch = 2 if smoke else (32 if form.decode else max(1, TOKENS_PER_BATCH // seq))
            pairs = visible_pairs(form, seq) * batch * form.n_heads
            fwd_flops = 2 * pairs * (form.head_dim + form.v_dim)
            for backend in backends:
                row = dict(form=form.name, case=form.case, context=seq, batch=batch, backend=backend)
                row.update(_time_backend(form, seq, batch, backend, device, dtype, repeats, fwd_flops, smoke))
                rows.append(row)
    return _with_auto_ratio(rows)


def _time_backend(form, seq, batch, backend, device, dtype, repeats, fwd_flops, smoke) -> dict:
    if backend in ("eager", "sdpa-math") and not smoke and seq > 2048:
        return {"status": "skipped: materialises (B, H, T, T) scores"}
    try:
        q, k, v, kwargs = _inputs(form, seq, batch, device, dtype, grad=not form.decode)
        result = {"resolved": resolve_backend(backend, q, k=k, v=v, **kwargs)}

        def forward():
            return attention(q, k, v, backend=backend, **kwargs)

        with torch.no_grad():  # an inference forward: no autograd bookkeeping in the timing
            out = forward()
            result["fwd_ms"] = 1e3 * timed(forward, repeats=repeats)
        result["fwd_tflops"] = fwd_flops / result["fwd_ms"] / 1e9
        result["status"] = "ok"
    except BackendUnavailable as err:
        return {"status": f"n/a: {err}"}
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        return {"status": "out of memory"}
    if form.decode:  # bandwidth: every filled cache row is read once (MLA: K and V are the same row)
        row_values = k.shape[-1] + (0 if form.name == "mla-decode" else v.shape[-1])
        result["gbs"] = batch * seq * k.shape[2] * row_values * k.element_size() / result["fwd_ms"] / 1e6
        return result
    grad_out = torch.randn_like(out)

    def forward_backward():
        q.grad = k.grad = v.grad = None
        forward().backward(grad_out)

    try:
        result["fwd_bwd_ms"] = 1e3 * timed(forward_backward, repeats=repeats)
        result["fwd_bwd_tflops"] = 3.5 * fwd_flops / result["fwd_bwd_ms"] / 1e9  # backward ≈ 2.5 × forward
    except BackendUnavailable as err:
        result["fwd_bwd"] = f"n/a: {err}"
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        result["fwd_bwd"] = "out of memory"
    return result


def _key(row: dict) -> tuple:
    return row["form"], row["context"]


def _time(row: dict) -> float | None:
    return row.get("fwd_bwd_ms", row.get("fwd_ms")) if row["status"] == "ok" else None


def _with_auto_ratio(rows: list[dict]) -> list[dict]:
    """Mark each shape's best backend and how far ``auto`` is from it (target: within 5 %)."""
    for key in dict.fromkeys(_key(row) for row in rows):
        shape = [row for row in rows if _key(row) == key and _time(row) is not None]
        explicit = [row for row in shape if row["backend"] != "auto"]
        if not explicit:
            continue
        best = min(explicit, key=_time)
        for row in shape:
            row["vs_best"] = _time(row) / _time(best)
            row["best_backend"] = best["backend"]
    return rows


def table_rows(rows: list[dict], device_key: str, device_name: str) -> list[dict]:
    """``backend_table.json`` rows for this device: per case and context, the backends that ran every
    form of the case, fastest first (each form's time relative to its own best, summed over the
    case's forms); consecutive equal orders are merged into one row."""
    table = []
    for case in dict.fromkeys(row["case"] for row in rows):
        previous = None
        for seq in sorted({row["context"] for row in rows if row["case"] == case}):
            measured = [r for r in rows if r["case"] == case and r["context"] == seq and "vs_best" in r]
            n_forms = len({r["form"] for r in measured})
            relative: dict[str, list[float]] = {}
            for r in measured:
                if r["backend"] != "auto":
                    relative.setdefault(r["backend"], []).append(r["vs_best"])
            complete = {name: sum(times) for name, times in relative.items() if len(times) == n_forms}
            order = sorted(complete, key=complete.get)
            if not order or order == previous:
                continue
            table.append(
                {
                    "device": device_key,
                    "dtype": "half",
                    "case": case,
                    "min_keys": 0 if previous is None else seq,
                    "order": order if "sdpa" in order else [*order, "sdpa"],
                    "source": f"benchmarks/gpu.py on {device_name}: fastest first at {seq} keys",
                }
            )
            previous = order
    return table


def default_backends() -> list[str]:
    """Every backend that can run here, ``auto`` last."""
    return [*(name for name in available_backends() if name != "auto"), "auto"]
