"""Decode throughput: ms per step, tokens/s and KV bytes per form vs context length and batch, with
stock transformers in the same run, each figure also as a fraction of the HBM bound (the bytes a step
must read - weights and the filled cache - over the measured copy bandwidth)."""

from __future__ import annotations

import gc

import torch

from benchmarks.common import timed
from benchmarks.gpu_models import STOCK, Shape, build_kvforge, weight_bytes_read_per_step
from benchmarks.stock import build_stock
from kvforge.arch import StaticDecoder, kv_cache_bytes

MEMORY_HEADROOM = 0.85  # of the free GPU memory a cache may take


def copy_bandwidth(device: torch.device, n_bytes: int) -> float:
    """Bytes/s a device-to-device copy moves (read + write), best of the repeats."""
    source = torch.empty(n_bytes, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    seconds = timed(lambda: target.copy_(source), repeats=10, warmup=2)
    return 2 * n_bytes / seconds


def _kvforge_step_seconds(model, batch, context, steps, dtype, cuda_graph, compile, repeats) -> float:
    decoder = StaticDecoder(
        model, batch, context + steps + 1, dtype=dtype, cuda_graph=cuda_graph, compile=compile
    )
    for entry in decoder.cache.entries:  # any values do: a step's work does not depend on them
        for buffer in entry.buffers:
            buffer.normal_()
    first = torch.zeros(batch, dtype=torch.long, device=decoder.input_ids.device)

    def run():
        decoder.cache.reset()
        decoder.cache.advance(context)  # as if a `context`-token prompt had been prefilled
        ids = first
        for _ in range(steps):
            ids = decoder.step(ids).argmax(-1)

    return timed(run, repeats=repeats, warmup=1) / steps


@torch.no_grad()
def _stock_step_seconds(model, batch, context, steps, vocab, device, repeats) -> float:
    prompt = torch.randint(0, vocab, (1, context), device=device)
    cache = model(prompt, use_cache=True, logits_to_keep=1).past_key_values
    cache.batch_repeat_interleave(batch)  # one prefill, copied to every row
    first = torch.randint(0, vocab, (batch, 1), device=device)

    def run():
        ids = first
        for _ in range(steps):
            ids = model(input_ids=ids, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
        cache.crop(-steps)  # drop what the run appended (a negative count: transformers 4 and 5)

    return timed(run, repeats=repeats, warmup=1) / steps


def _fits(n_bytes: int, device: torch.device) -> bool:
    if device.type != "cuda":
        return True
    free, _ = torch.cuda.mem_get_info(device)
    return n_bytes < MEMORY_HEADROOM * free


def measure_decode(
    shape: Shape,
    forms: list[str],
    contexts: list[int],
    batches: list[int],
    steps: int,
    device: torch.device,
    dtype: torch.dtype,
    bandwidth: float,
    stock: bool,
    cuda_graph: bool,
    compile: bool,
    repeats: int,
) -> list[dict]:
    rows = []
    for form in forms:
        config = shape.config(form)
        models = {"kvforge": build_kvforge(config, device, dtype).eval()}
        if stock and form in STOCK:
            models["transformers"] = build_stock(config, device, dtype).eval()
        for context in contexts:
            for batch in batches:
                cache_bytes = kv_cache_bytes(config, context, dtype, batch)
                for impl, model in models.items():
                    weights = weight_bytes_read_per_step(model)
                    row = dict(form=form, impl=impl, context=context, batch=batch, kv_bytes=cache_bytes)
                    row["hbm_bound_ms"] = 1e3 * (weights + cache_bytes) / bandwidth
                    if not _fits(kv_cache_bytes(config, context + steps + 1, dtype, batch), device):
                        rows.append({**row, "status": "skipped: cache does not fit"})
                        continue
                    try:
                        if impl == "kvforge":
                            seconds = _kvforge_step_seconds(
                                model, batch, context, steps, dtype, cuda_graph, compile, repeats
                            )
                        else:
                            seconds = _stock_step_seconds(
                                model, batch, context, steps, config.vocab_size, device, repeats
                            )
                        row.update(status="ok", ms_step=1e3 * seconds, tokens_per_s=batch / seconds)
                        row["hbm_fraction"] = row["hbm_bound_ms"] / row["ms_step"]
                    except torch.OutOfMemoryError:
                        row["status"] = "out of memory"
                    gc.collect()
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                    rows.append(row)
        del models
        gc.collect()
    return _with_speedups(rows)


def _with_speedups(rows: list[dict]) -> list[dict]:
    stock = {
        (r["form"], r["context"], r["batch"]): r["tokens_per_s"]
        for r in rows
        if r["impl"] == "transformers" and r["status"] == "ok"
    }
    for row in rows:
        key = (row["form"], row["context"], row["batch"])
        if row["impl"] == "kvforge" and row["status"] == "ok" and key in stock:
            row["vs_transformers"] = row["tokens_per_s"] / stock[key]
    return rows
