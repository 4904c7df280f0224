"""Resident memory while the calibration text is sampled on the host: a VmRSS timeline, and what is real.

    PYTHONPATH=. python -m benchmarks.sampling_memory /tmp/kvforge-scale/0.95b --seq-len 64 [--no-pin] [--fresh-buffers]

Samples ``8 × seq-len`` tokens exactly as ``convert_checkpoint`` does on the CPU (stored dtype, the
second half of the layers streamed above 1 GiB) while a thread reads ``VmRSS`` from
``/proc/self/status`` every 0.25 s. It prints the bytes the live tensors need (resident parameters
and the KV cache) beside the process's peak and its RSS once the model is freed: what the peak has
beyond the tensors is the allocator's (``--no-pin`` leaves glibc's mmap threshold dynamic, as before
``convert_checkpoint`` pinned it). Sampling runs on one thread, as in ``convert_checkpoint``; the
seconds per step compare the streamed layers read into the reused ``LayerSlab`` (default) against
``--fresh-buffers`` (a new buffer per tensor and step, as before it): run both, one after the other.
"""

from __future__ import annotations

import argparse
import resource
import threading
import time
from types import MappingProxyType

from benchmarks.source_tree import ensure_kvforge_importable

GIB = 2**30
ROWS = 8


def resident_gib() -> float:
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmRSS"))
    return int(line.split()[1]) * 1024 / GIB


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--no-pin", action="store_true", help="leave glibc's mmap threshold dynamic")
    parser.add_argument(
        "--fresh-buffers", action="store_true", help="read streamed layers into new buffers (no LayerSlab)"
    )
    args = parser.parse_args(argv)
    ensure_kvforge_importable()
    import torch

    from kvforge.conversion.convert import _streamed_while_sampling
    from kvforge.conversion.host import one_cpu_thread, pin_mmap_threshold
    from kvforge.conversion.loading import open_checkpoint
    from kvforge.conversion.transforms import calibration

    pinned = False if args.no_pin else pin_mmap_threshold()
    timeline: list[tuple[float, float]] = []
    done = threading.Event()
    start = time.perf_counter()

    def watch() -> None:
        while not done.is_set():
            timeline.append((time.perf_counter() - start, resident_gib()))
            time.sleep(0.25)

    threading.Thread(target=watch, daemon=True).start()
    weights = open_checkpoint(args.checkpoint)
    config = weights.config
    streamed = _streamed_while_sampling(config, weights, torch.device("cpu"))
    built = {}
    build_model = calibration.build_model

    def measured_build(*a, **k):  # the resident parameters, counted once the model exists
        model = build_model(*a, **k)
        built["parameters"] = sum(
            p.numel() * p.element_size() for p in model.parameters() if p.device.type != "meta"
        )
        built["rss"] = resident_gib()
        return model

    calibration.build_model = measured_build
    # a mapping without CheckpointWeights.read: build_model then reads every tensor into a new buffer
    source = MappingProxyType(weights) if args.fresh_buffers else weights
    cpu, sampling = time.process_time(), time.perf_counter()
    with one_cpu_thread():
        calibration.sample_calibration_ids(
            config, source, ROWS * args.seq_len, args.seq_len, 0, dtype=weights.dtype, streamed=streamed
        )
    per_step = (time.perf_counter() - sampling) / args.seq_len
    done.set()
    layer_bytes = weights.nbytes / config.n_layers  # about: embeddings and head are small beside 16 layers
    cache = ROWS * (args.seq_len + 1) * config.n_layers * 2 * config.n_kv_heads * config.head_dim
    cache *= weights.dtype.itemsize
    print(
        f"checkpoint {weights.nbytes / GIB:.2f} GiB, layers streamed: {list(streamed)}, pinned: {pinned}, "
        f"{'fresh buffers' if args.fresh_buffers else 'reused slab'}: {per_step:.3f} s a step (one thread)"
    )
    print(
        f"live tensors: resident parameters {built['parameters'] / GIB:.2f} GiB + KV cache {cache / GIB:.2f} GiB "
        f"+ one streamed layer ~{layer_bytes / GIB:.2f} GiB"
    )
    peak = max(rss for _, rss in timeline)
    print(
        f"VmRSS: after build {built['rss']:.2f} GiB, peak {peak:.2f} GiB (ru_maxrss "
        f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB:.2f}), after sampling "
        f"(model freed) {resident_gib():.2f} GiB; {time.perf_counter() - start:.0f} s wall, "
        f"{time.process_time() - cpu:.0f} CPU-s"
    )
    step = max(1, len(timeline) // 12)
    print("timeline (s, GiB): " + ", ".join(f"{t:.0f} {rss:.2f}" for t, rss in timeline[::step]))


if __name__ == "__main__":
    main()
