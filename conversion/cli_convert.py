"""Change the attention of a model directory into a KV-efficient form and export it.

    kvforge convert SRC OUT --to gqa|mqa|mla|cla|window|chunked|gta|gla|linear|deltanet [form options]
                    [--calib self|FILE|none --calib-tokens N] [--refine-steps N] [--device auto|cpu|cuda]
                    [--family auto] [--dtype bf16] [--overwrite]

Examples (stories260K: 8 query heads, 4 K/V heads of 8 dims, 5 layers):

    kvforge convert stories260K gqa2 --to gqa --n-kv-heads 2                # self-calibrated (default)
    kvforge convert stories260K mla --to mla --kv-lora-rank 24 --rope-dims 8 --refine-steps 200
    kvforge convert stories260K cla --to cla --factor 2 --calib botchan.txt   # kvforge-typed
    kvforge convert stories260K swa --to window --windows 64,64,64,64,none
    kvforge convert stories260K gdn --to deltanet --ratio 3                   # 3 Gated DeltaNet : 1 kept
    kvforge convert stories260K lin --to linear --layers 0,1,2,4 --linear-window 64

The recipe that meets every zero-shot target on stories260K (docs/transforms.md) is self-calibration
(the default: text sampled from SRC itself, so it never overlaps your evaluation text) plus
``--refine-steps 200``: zero-shot GQA-1/2 +0.24, MQA +0.72, MLA-32 +0.10, CLA-2 +0.32 nats/token on
stories260K (without refinement +0.52, +1.03, +0.19, +0.56; from the weights alone GQA-1/2 +1.00).
``--refine-steps auto`` (the default) refines where it is cheap: 200 steps on CUDA and for small models
(d_model <= 512) on the CPU; none for larger models on the CPU, where it costs more than the conversion
(at 0.95B about 1 s per step and layer on 2 cores: ~1 h against ~15 min). ``--calib FILE`` fits on a text file instead; ``--calib none`` uses the weights
alone (much worse). SRC is read one layer at a time from its safetensors (validated from their headers
first) and the math runs on ``--device`` (default: CUDA when available): host memory stays near one
layer, not the model. Options are checked against SRC's config before any weight is read; OUT is
written shard by shard into a temporary sibling and renamed into place (a failure leaves nothing
behind). The result is a stock class (Llama, Mistral, Qwen2, DeepseekV3, ...) when one holds the new
form, else a kvforge-typed directory that stock servers will not load - the command says which.
Python: ``kvforge.conversion.convert.convert_checkpoint(src, out, transform, options, device=...)``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .cli_export import FAMILY_CHOICES

FORMS = ("gqa", "mqa", "mla", "cla", "window", "chunked", "gta", "gla", "linear", "deltanet")
RECIPE_REFINE_STEPS = 200
CPU_REFINE_MAX_D_MODEL = 512


def torch_cpu():
    import torch

    return torch.device("cpu")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", metavar="SRC", help="model directory to convert (HF or kvforge-typed)")
    parser.add_argument("out", metavar="OUT", help="directory to write; must not exist unless --overwrite")
    parser.add_argument("--to", required=True, choices=FORMS, help="target attention form")
    group = parser.add_argument_group("gqa / mqa")
    group.add_argument("--n-kv-heads", type=int, help="K/V heads per layer (must divide the query heads)")
    group.add_argument(
        "--method",
        choices=("aligned", "mean"),
        default="aligned",
        help="aligned (default): heads grouped by how well their keys/values merge, keys merged per rotary "
        "pair, values into their common subspace, o_proj refitted; mean: the GQA paper's mean-pooling",
    )
    group = parser.add_argument_group("mla")
    group.add_argument(
        "--kv-lora-rank", type=int, help="latent width cached per token (DeepSeek's kv_lora_rank)"
    )
    group.add_argument(
        "--rope-dims",
        type=int,
        help="rotary dims of the shared key (qk_rope_head_dim; even, at most head_dim)",
    )
    group.add_argument(
        "--rope-selection",
        choices=("contribution", "high", "uniform"),
        default="contribution",
        help="which frequency pairs stay rotary: the ones the calibration attention needs most (default), "
        "the highest frequencies, or evenly spread ones (always a progression DeepseekV3 can express)",
    )
    group.add_argument(
        "--layout",
        choices=("deepseek", "kvforge"),
        default="deepseek",
        help="deepseek (default): stock DeepseekV3 (one shared rotary key, latent RMSNorm); kvforge: one rotary "
        "key per source K/V head and no latent norm (exact at full rank, kvforge-typed)",
    )
    group = parser.add_argument_group("cla")
    group.add_argument("--factor", type=int, default=2, help="layers per group sharing one K/V (default 2)")
    group.add_argument(
        "--init",
        choices=("fit", "first", "mean"),
        default="fit",
        help="fit (default): shared K/V fitted to every layer of the group; first: the first layer's; mean: average",
    )
    group.add_argument("--offset", type=int, default=0, help="layers before this one keep their own K/V")
    group = parser.add_argument_group("window")
    group.add_argument(
        "--windows",
        help="one window for every layer, or a comma pattern tiled over the layers; 'none' = global "
        "(e.g. 1024,1024,1024,none = 3 local : 1 global)",
    )
    group.add_argument(
        "--sinks",
        action="store_true",
        help="attention sinks on the windowed layers, fitted on --calib (kvforge-typed export)",
    )
    group = parser.add_argument_group("chunked (Llama 4's pattern)")
    group.add_argument(
        "--chunk", type=int, help="tokens per chunk of the local layers (attention_chunk_size)"
    )
    group.add_argument(
        "--global-every", type=int, default=4, help="every N-th layer stays global (default 4, as Llama 4)"
    )
    group.add_argument(
        "--keep-rope", action="store_true", help="keep RoPE on the global layers (default: NoPE)"
    )
    group = parser.add_argument_group("gla (gta takes no option: one tied state per K/V head)")
    group.add_argument(
        "--n-latent-heads",
        type=int,
        help="latent heads splitting kv_lora_rank (an MHA/GQA source also needs --kv-lora-rank, --rope-dims)",
    )
    group = parser.add_argument_group("linear / deltanet (constant-state layers; docs/transforms.md)")
    group.add_argument(
        "--layers",
        help="comma list of the layers to convert (default: --ratio converted per kept full-attention layer)",
    )
    group.add_argument(
        "--ratio", type=int, default=3, help="converted layers per kept full-attention layer (default 3)"
    )
    group.add_argument(
        "--keep",
        choices=("even", "ends", "error"),
        default="even",
        help="which layers keep full attention: even (default: every ratio+1-th, Qwen3-Next's layout), ends "
        "(first and last first), error (those whose attention transfer fits worst; fits every layer twice)",
    )
    group.add_argument(
        "--linear-window",
        type=int,
        default=64,
        help="linear: softmax window of the same layer, as LoLCATs (default 64; 0 = plain linear attention)",
    )
    group.add_argument(
        "--feature-dim", type=int, help="linear: Hedgehog features per sign (default head_dim)"
    )
    group.add_argument("--conv-size", type=int, help="deltanet: short convolution width (default 4)")
    group.add_argument(
        "--transfer",
        choices=("new", "all"),
        default="new",
        help="attention transfer trains the new parameters (default) or the whole block",
    )
    group.add_argument(
        "--transfer-steps",
        type=int,
        default=300,
        help="attention-transfer Adam steps per layer (default 300)",
    )
    group = parser.add_argument_group(
        "calibration (gqa, mqa, mla, cla, gta, gla, linear, deltanet, window --sinks)"
    )
    group.add_argument(
        "--calib",
        metavar="FILE|self|none",
        default="self",
        help="self (default): fit on text sampled from SRC itself; FILE: a text file (not your evaluation "
        "text); none: from the weights alone (much worse, see docs/transforms.md)",
    )
    group.add_argument("--calib-tokens", type=int, default=16384, help="calibration tokens (default 16384)")
    group.add_argument(
        "--calib-seq-len",
        type=int,
        default=None,
        help="tokens per calibration sequence (default min(512, context))",
    )
    group.add_argument(
        "--refine-steps",
        type=refine_steps_argument,
        default="auto",
        help=f"after the closed-form fit, Adam steps per layer on the block's reconstruction error. auto "
        f"(default): {RECIPE_REFINE_STEPS} (the measured recipe) on CUDA and for models up to d_model "
        f"{CPU_REFINE_MAX_D_MODEL} on the CPU; 0 for larger models on the CPU, where it would take longer than "
        "the conversion itself (about 1 s per step and layer at d_model 2048 on 2 cores: ~1 h at 0.95B)",
    )
    group.add_argument("--seed", type=int, default=0, help="seed of --calib self sampling")
    group = parser.add_argument_group("export")
    group.add_argument(
        "--family",
        default="auto",
        choices=FAMILY_CHOICES,
        help="export family (default auto: the simplest stock class that holds the result, else kvforge-typed)",
    )
    group.add_argument(
        "--dtype", choices=("fp32", "bf16", "fp16"), default=None, help="store tensors in this dtype"
    )
    group.add_argument("--overwrite", action="store_true", help="replace OUT if it exists (atomically)")
    parser.add_argument(
        "--device",
        default="auto",
        help="where the layers run and the fits are computed: auto (default: cuda when available), cpu, cuda[:N]",
    )


def refine_steps_argument(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        steps = int(text)
    except ValueError:
        steps = -1
    if steps < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not 'auto' or a number of steps >= 0")
    return steps


def resolve_refine_steps(value: int | str, device, d_model: int) -> int:
    """``auto``: the recipe's steps where they are cheap - on CUDA, or on the CPU for models up to
    ``d_model`` 512 - and none for larger models on the CPU, where they would cost more than the
    conversion (measured about 1.1 s per step and layer at d_model 2048 on 2 cores, growing as d_model²)."""
    if value != "auto":
        return int(value)
    cheap = device.type == "cuda" or d_model <= CPU_REFINE_MAX_D_MODEL
    return RECIPE_REFINE_STEPS if cheap else 0


def transform_options(args: argparse.Namespace, device=None, d_model: int = 0) -> dict:
    """The transform's keyword options from the command line (missing required ones are errors);
    ``device`` and ``d_model`` resolve ``--refine-steps auto`` (device None: the CPU)."""
    required = {
        "gqa": ("n_kv_heads",),
        "mla": ("kv_lora_rank", "rope_dims"),
        "window": ("windows",),
        "chunked": ("chunk",),
        "gla": ("n_latent_heads",),
    }
    for name in required.get(args.to, ()):
        if getattr(args, name) is None:
            raise ValueError(f"--to {args.to} needs --{name.replace('_', '-')}")
    steps = resolve_refine_steps(args.refine_steps, device if device is not None else torch_cpu(), d_model)
    fitted = {"refine_steps": steps, "progress": True}
    if args.to == "gqa":
        return {"n_kv_heads": args.n_kv_heads, "method": args.method, **fitted}
    if args.to == "mqa":
        return {"method": args.method, **fitted}
    if args.to == "mla":
        names = ("kv_lora_rank", "rope_dims", "rope_selection", "layout")
        return {**{name: getattr(args, name) for name in names}, **fitted}
    if args.to == "cla":
        return {"factor": args.factor, "init": args.init, "offset": args.offset, **fitted}
    if args.to == "gta":
        return {}
    if args.to == "gla":
        mla = {
            name: getattr(args, name)
            for name in ("kv_lora_rank", "rope_dims")
            if getattr(args, name) is not None
        }
        return {"n_latent_heads": args.n_latent_heads, **mla}
    if args.to == "chunked":
        return {"chunk": args.chunk, "global_every": args.global_every, "nope": not args.keep_rope}
    if args.to in ("linear", "deltanet"):
        return state_options(args, fitted)
    return {"windows": parse_windows(args.windows), "sinks": args.sinks}


def state_options(args: argparse.Namespace, fitted: dict) -> dict:
    """``to_linear`` / ``to_deltanet`` options from the command line."""
    options = {
        "ratio": args.ratio,
        "keep": args.keep,
        "transfer": args.transfer,
        "transfer_steps": args.transfer_steps,
        "refine_steps": fitted["refine_steps"] if args.refine_steps != "auto" else 0,
        "progress": True,
    }
    if args.layers:
        try:
            options["layers"] = [int(item) for item in args.layers.split(",")]
        except ValueError:
            raise ValueError(f"--layers {args.layers!r}: expected a comma list of layer indices") from None
    if args.to == "linear":
        options.update(window=args.linear_window, feature_dim=args.feature_dim)
    else:
        options["conv_size"] = args.conv_size
    return options


def parse_windows(text: str) -> int | list[int | None]:
    values: list[int | None] = []
    for item in text.split(","):
        item = item.strip().lower()
        if item in ("none", "global"):
            values.append(None)
            continue
        try:
            values.append(int(item))
        except ValueError:
            raise ValueError(f"--windows: {item!r} is neither a number of tokens nor 'none'") from None
    return values[0] if len(values) == 1 and values[0] is not None else values


def run(args: argparse.Namespace) -> int:
    src, out = Path(args.src), Path(args.out)
    if out.exists() and not args.overwrite:  # before any reading
        raise FileExistsError(f"{out} already exists; pass --overwrite to replace it")
    calibration = None if args.calib == "none" else args.calib
    if calibration not in (None, "self") and not Path(calibration).is_file():
        raise FileNotFoundError(f"--calib {args.calib}: no such file (or pass 'self' or 'none')")
    from rich.console import Console

    from kvforge.arch import kv_bytes_per_token
    from kvforge.conversion import plan_export
    from kvforge.conversion.convert import convert_checkpoint, resolve_device, uses_calibration
    from kvforge.conversion.pretrained import load_config

    console = Console(highlight=False)
    device = resolve_device(args.device)
    d_model = load_config(src)[0].d_model
    options = transform_options(
        args, device, d_model
    )  # checked against SRC's config before any weight is read
    if calibration is not None and uses_calibration(args.to, options):
        what = (
            f"{args.calib_tokens} tokens sampled from {src} (seed {args.seed})"
            if calibration == "self"
            else calibration
        )
        console.print(f"Calibration: {what}; converting one layer at a time on {device}")
        if "refine_steps" in options:
            source = (
                "--refine-steps auto on " + device.type if args.refine_steps == "auto" else "--refine-steps"
            )
            console.print(f"Refinement: {options['refine_steps']} Adam steps per layer ({source})")
    _, config, new_config = convert_checkpoint(
        src,
        out,
        args.to,
        options,
        device=device,
        calibration=calibration,
        calib_tokens=args.calib_tokens,
        calib_seq_len=args.calib_seq_len,
        seed=args.seed,
        family=None if args.family == "auto" else args.family,
        dtype=args.dtype,
        overwrite=args.overwrite,
    )
    plan = plan_export(new_config, None if args.family == "auto" else args.family)
    before = kv_bytes_per_token(config, config.max_seq_len, "bf16")
    after = kv_bytes_per_token(new_config, config.max_seq_len, "bf16")
    console.print(
        f"Wrote {out} as {plan.family.architecture}: KV cache {after:,.0f} bytes/token in bf16 at "
        f"{config.max_seq_len} tokens (source {before:,.0f}, x{after / before:.3f})"
    )
    if not plan.family.stock:
        console.print(
            "[bold red]WARNING:[/] kvforge-typed directory: stock transformers/vLLM/SGLang will NOT load it"
        )
    for note in plan.notes:
        console.print(f"[bold yellow]note:[/] {note}")
    return 0
