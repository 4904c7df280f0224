"""Uptrain a random-weight 0.95B checkpoint (16 × 2048, MHA → GQA-4, mean-pooled) with a bf16 teacher on
one GPU: tokens/s, MFU and peak CUDA memory beside ``MemoryCheck``'s estimate.

    mkdir -p /tmp/src && ln -sfn "$PWD" /tmp/src/kvforge && export PYTHONPATH=/tmp/src:$PWD
    python3 benchmarks/gpu_uptrain.py --out $OUT/uptrain.json                      # 20 steps of 8 × 2048
    python3 benchmarks/gpu_uptrain.py --activation-checkpointing --batch 16          # the other memory regime
    python3 benchmarks/gpu_uptrain.py --smoke                                        # tiny, CPU, seconds

``benchmarks/scale_training.py`` with GPU defaults (bf16-mixed, so the teacher is bf16; distillation
α = 0.5 with the chunked fused loss). MFU counts the student's training FLOPs plus the teacher's
forward (``KVForgeLM.flops_per_batch``) against the dense bf16 peak of ``benchmarks/gpu_training.py``.
Needs torch, lightning, transformers and safetensors only.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import scale_training


def main(argv: list[str] | None = None) -> list[dict]:
    parser = scale_training.parser()
    parser.set_defaults(shape="0.95b", precision="bf16-mixed", steps=20, warmup=5, batch=8, seq=2048)
    args = parser.parse_args(argv)
    if args.smoke:
        args.shape, args.steps, args.warmup, args.seq, args.n_kv_heads = "smoke", 3, 1, 32, 2
        args.batch, args.precision, args.cpu = 2, "32-true", True
    records = scale_training.train(args)
    rows = [scale_training.summarise(record, args, args.warmup) for record in records]
    if rows and not args.cpu:
        import torch

        from benchmarks.gpu_training import peak_flops

        peak = peak_flops(torch.device("cuda"), None)
        for row, record in zip(rows, records):
            row["mfu"] = record["flops_per_batch"] / row["step_s"] / peak if peak else None
    if rows:
        scale_training.print_rows(rows)
        if args.out:
            import json

            Path(args.out).write_text(json.dumps(rows, indent=1) + "\n")
    return rows


if __name__ == "__main__":
    main()
