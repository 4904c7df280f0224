"""What refinement (``--refine-steps``) costs per layer at the scale shapes, against the layer's own
forward pass over the calibration tokens measured in the same run.

One decoder layer's attention of the shape (random weights; the cost does not depend on them), converted
to GQA-4 and to MLA 512+64, with 8 × 512 calibration tokens; ``refine_attention`` runs its Adam steps
(4 × 512 tokens each) and the table projects 200 steps × the shape's layers. This is what decides
``kvforge convert --refine-steps auto`` (refine on CUDA and for small models on the CPU).

    PYTHONPATH=. python -m benchmarks.refine_cost --shapes 0.27b,0.95b [--steps 3] [--device cpu]
"""

from __future__ import annotations

import argparse
import time

import torch
from rich.console import Console
from rich.table import Table

from kvforge.arch import ModelConfig
from kvforge.arch.model import DecoderLayer, rotary_key
from kvforge.conversion.transforms.calibration import rope_tables
from kvforge.conversion.transforms.fitting import FitUnit, refine_attention, run_units

from .scale_checkpoints import SHAPES

SEQ, ROWS, RECIPE_STEPS = 512, 8, 200


def forms(shape) -> dict[str, ModelConfig]:
    base = dict(
        vocab_size=shape.vocab_size,
        d_model=shape.d_model,
        n_layers=1,
        n_heads=shape.n_heads,
        ffn_dim=shape.ffn_dim,
        max_seq_len=shape.max_seq_len,
    )
    mla = dict(
        kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=shape.head_dim, v_head_dim=shape.head_dim
    )
    return {
        "gqa-4": ModelConfig(**base, n_kv_heads=4),
        "mla-512+64": ModelConfig(**base, pattern=[{"attention": "mla"}], **mla),
    }


def timed(fn, *args) -> tuple[float, float]:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter(), time.process_time()
    fn(*args)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shapes", default="0.27b,0.95b", help=f"comma-separated, from {sorted(SHAPES)}")
    parser.add_argument("--steps", type=int, default=3, help="timed refinement steps (after one warm-up)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    table = Table(title=f"refinement cost per layer ({device}, {torch.get_num_threads()} threads)")
    for column in (
        "shape",
        "form",
        "forward s",
        "step s (wall)",
        "step CPU s",
        "step / forward",
        "200 x layers",
    ):
        table.add_column(column, justify="right")
    for name in args.shapes.split(","):
        shape = SHAPES[name]
        for form, config in forms(shape).items():
            torch.manual_seed(0)
            module = DecoderLayer(config, 0).self_attn.to(device).requires_grad_(False)
            rope = tuple(t.to(device) for t in rope_tables(config, SEQ)[rotary_key(config, config.layers[0])])
            inputs = [torch.randn(ROWS, SEQ, shape.d_model, device=device)]
            unit = FitUnit(module, inputs, [torch.randn_like(inputs[0])], rope)
            with torch.no_grad():
                forward, _ = timed(run_units, [unit], 0)
            refine_attention([unit], 1)  # warm-up
            wall, cpu = timed(refine_attention, [unit], args.steps)
            step = wall / args.steps
            projected = step * RECIPE_STEPS * shape.n_layers
            table.add_row(
                name,
                form,
                f"{forward:.2f}",
                f"{step:.2f}",
                f"{cpu / args.steps:.2f}",
                f"{step / forward:.1f}x",
                f"{projected / 60:.0f} min",
            )
    Console().print(table)


if __name__ == "__main__":
    main()
