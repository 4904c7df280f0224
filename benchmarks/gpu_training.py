"""Training throughput: tokens/s and MFU of one optimizer step (forward, backward, fused AdamW, bf16
weights) per attention form, with stock transformers (eager and ``torch.compile``) measured in the
same run on the same shape. FLOPs per token are :func:`kvforge.arch.flops_per_token` (PaLM's count, per
attention form; 6·N + 12·L·d·T for dense MHA, the convention of GPU.md)."""

from __future__ import annotations

import gc

import torch

from benchmarks.common import timed
from benchmarks.gpu_models import STOCK, Shape, build_kvforge
from benchmarks.stock import build_stock
from kvforge.arch import flops_per_token

# Dense bf16 tensor-core peak (H100/H200 SXM), the denominator of GPU.md's MFU figures.
PEAK_BF16_FLOPS = {"H100": 989.5e12, "H200": 989.5e12}


def peak_flops(device: torch.device, override_tflops: float | None) -> float | None:
    if override_tflops:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_BF16_FLOPS.items() if key in name), None)


def _free(*objects) -> None:
    del objects
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    torch._dynamo.reset()


def _optimizer(model: torch.nn.Module, device: torch.device) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")


def _kvforge_step(model, ids, optimizer):
    def step():
        optimizer.zero_grad(set_to_none=True)
        model.loss(ids[:, :-1], ids[:, 1:]).backward()
        optimizer.step()

    return step


def _stock_step(model, ids, optimizer):
    inputs = ids[:, :-1]

    def step():
        optimizer.zero_grad(set_to_none=True)
        model(input_ids=inputs, labels=inputs).loss.backward()  # transformers shifts the labels itself
        optimizer.step()

    return step


def measure_training(
    shape: Shape,
    forms: list[str],
    modes: list[str],
    stock: bool,
    batch: int,
    seq: int,
    device: torch.device,
    dtype: torch.dtype,
    repeats: int,
    peak: float | None,
) -> list[dict]:
    """Rows per (implementation, form, mode); ``mode`` is ``eager`` or ``compile`` (kvforge compiles
    each decoder layer, torchtitan-style; transformers gets ``torch.compile(model)``)."""
    rows = []
    ids = torch.randint(0, shape.base().vocab_size, (batch, seq + 1), device=device)
    jobs = [("transformers", "gqa", mode) for mode in modes] if stock else []
    jobs += [("kvforge", form, mode) for form in forms for mode in modes]
    for impl, form, mode in jobs:
        config = shape.config(form)
        row = dict(impl=impl, form=form, mode=mode, batch=batch, seq=seq)
        model = optimizer = None
        try:
            if impl == "kvforge":
                model = build_kvforge(config, device, dtype).train()
                if mode == "compile":
                    for layer in model.model.layers:
                        layer.compile()
                optimizer = _optimizer(model, device)
                step = _kvforge_step(model, ids, optimizer)
            else:
                model = build_stock(config, device, dtype).train()
                optimizer = _optimizer(model, device)
                step = _stock_step(torch.compile(model) if mode == "compile" else model, ids, optimizer)
            seconds = timed(step, repeats=repeats, warmup=3 if mode == "compile" else 1)
            tokens_per_s = batch * seq / seconds
            row.update(status="ok", stock_model=STOCK.get(form) if impl == "transformers" else None)
            row.update(step_ms=1e3 * seconds, tokens_per_s=tokens_per_s)
            row["mfu"] = tokens_per_s * flops_per_token(config, seq) / peak if peak else None
        except torch.OutOfMemoryError:
            row["status"] = "out of memory"
        finally:
            _free(model, optimizer)
        rows.append(row)
    baseline = {
        r["mode"]: r["tokens_per_s"] for r in rows if r["impl"] == "transformers" and r["status"] == "ok"
    }
    for row in rows:
        if row["impl"] == "kvforge" and row["status"] == "ok":
            for mode, tokens in baseline.items():
                row[f"vs_transformers_{mode}"] = row["tokens_per_s"] / tokens
    return rows
