"""Change the attention of a model directory into a KV-efficient form and export it.

    kvforge convert SRC OUT --to TRANSFORM [its options: see the groups below, docs/transforms.md]
                    [--calib self|FILE|none --calib-tokens N] [--refine-steps N] [--device auto|cpu|cuda]
                    [--family auto] [--dtype bf16] [--overwrite] [--fail-if-noop]

Examples (stories260K: 8 query heads, 4 K/V heads of 8 dims, 5 layers):

    kvforge convert stories260K gqa2 --to gqa --n-kv-heads 2                # self-calibrated (default)
    kvforge convert stories260K mla --to mla --kv-lora-rank 24 --rope-dims 8 --refine-steps 100
    kvforge convert stories260K cla --to cla --factor 2 --calib botchan.txt   # kvforge-typed
    kvforge convert stories260K swa --to window --windows 64,64,64,64,none
    kvforge convert stories260K gdn --to deltanet --ratio 3                   # 3 Gated DeltaNet : 1 kept
    kvforge convert stories260K lin --to linear --layers 0,1,2,4 --window 64  # LoLCATs-style, kvforge-typed

The recipe that meets every zero-shot target on stories260K (docs/transforms.md) is self-calibration
(the default: text sampled from SRC itself, so it never overlaps your evaluation text) plus
``--refine-steps 100``. ``--refine-steps auto`` (the default) refines where it is cheap: 100 steps on
CUDA and for small models (d_model <= 512) on the CPU; none for larger models on the CPU, where it costs
more than the conversion (figures: docs/results.md, "Refinement cost"). ``--calib FILE`` fits on a text
file instead; ``--calib none`` uses the weights alone (much worse). SRC is read one layer at a time from its safetensors (validated from their headers
first) and the math runs on ``--device`` (default: CUDA when available): host memory stays near one
layer, not the model. Every check SRC's config and weight headers allow runs before anything is
printed or sampled: a source the transform can never convert is refused before a missing option, a bad
count before a missing one. A conversion that would change nothing (``--to mqa`` on an MQA model) says
"nothing to change" and writes an unchanged copy without calibrating (``--fail-if-noop``: writes nothing,
exit status 3). OUT is written layer by layer into a temporary sibling, packed as ``kvforge export``
packs (one ``model.safetensors`` up to 5GB, else 5GB shards) and renamed into place (a failure leaves
nothing behind). The result is a stock class (Llama, Mistral, Qwen2, DeepseekV3, ...) when one holds the new
form, else a kvforge-typed directory that stock servers will not load - the command says which.
Python: ``kvforge.conversion.convert.convert_checkpoint(src, out, transform, options, device=...)``.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import types
import typing
from pathlib import Path
from typing import Literal

import torch
from rich.console import Console

from kvforge.arch import kv_bytes_per_token
from kvforge.conversion import gguf, plan_export
from kvforge.conversion.convert import ConversionStart, convert_checkpoint
from kvforge.conversion.loading import resolve_device
from kvforge.conversion.pretrained import load_config
from kvforge.conversion.tokenizer_check import tokenizer_mismatch
from kvforge.conversion.transforms import TRANSFORMS, Transform
from kvforge.conversion.transforms.record import COUNT_OPTIONS
from kvforge.conversion.transforms.targets import source_check

from .export import FAMILY_CHOICES, add_output_arguments

RECIPE_REFINE_STEPS = 100
CPU_REFINE_MAX_D_MODEL = 512
# Options the command itself reads (``--refine-steps auto``), not generated from the dataclasses.
COMMAND_OPTIONS = ("refine_steps",)
NOOP_EXIT = 3  # --fail-if-noop: the conversion would change nothing


class NothingToChange(Exception):
    """--fail-if-noop, and the conversion would leave SRC as it is."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "src",
        metavar="SRC",
        help="model directory to convert (HF or kvforge-typed) or a llama.cpp .gguf file",
    )
    parser.add_argument("out", metavar="OUT", help="directory to write; must not exist unless --overwrite")
    parser.add_argument("--to", required=True, choices=list(TRANSFORMS), help="target attention form")
    add_transform_options(parser)
    calibrated = ", ".join(name for name, record in TRANSFORMS.items() if record.calibrates)
    group = parser.add_argument_group(f"calibration ({calibrated})")
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
        "the conversion itself (docs/results.md, 'Refinement cost')",
    )
    group.add_argument("--seed", type=int, default=0, help="seed of --calib self sampling")
    group = parser.add_argument_group("export")
    group.add_argument(
        "--family",
        default="auto",
        choices=FAMILY_CHOICES,
        help="export family (default auto: the simplest stock class that holds the result, else kvforge-typed)",
    )
    add_output_arguments(group, dtype_help="store tensors in this dtype")
    group.add_argument(
        "--fail-if-noop",
        action="store_true",
        help="exit 3 and write nothing when --to would leave SRC as it is (default: say 'nothing to change' "
        "and write an unchanged copy, exit 0)",
    )
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
    conversion (its cost grows as d_model²; docs/results.md, "Refinement cost")."""
    if value != "auto":
        return int(value)
    cheap = device.type == "cuda" or d_model <= CPU_REFINE_MAX_D_MODEL
    return RECIPE_REFINE_STEPS if cheap else 0


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _option_users() -> dict[str, list[tuple[Transform, dataclasses.Field]]]:
    """Each option name -> the transforms that have it, in registry order (one flag serves them all)."""
    users: dict[str, list[tuple[Transform, dataclasses.Field]]] = {}
    for record in TRANSFORMS.values():
        for item in record.fields():
            if item.name not in COMMAND_OPTIONS:
                users.setdefault(item.name, []).append((record, item))
    return users


def _base_type(hint):
    """``int | None`` -> int; ``Literal[...] | None`` -> the Literal."""
    args = [arg for arg in typing.get_args(hint) if arg is not type(None)]
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and len(args) == 1:
        return args[0]
    return hint


def add_transform_options(parser: argparse.ArgumentParser) -> None:
    """One flag per option of the registered transforms' dataclasses, in the group of the first transform
    that has it. Flags default to None: an option not given keeps its dataclass default."""
    users = _option_users()
    for record in TRANSFORMS.values():
        group = parser.add_argument_group(f"--to {record.name}: {record.summary}")
        for item in record.fields():
            if item.name in users and users[item.name][0][0] is record:
                _add_flag(group, item, users[item.name])


def _add_flag(group, item: dataclasses.Field, users: list[tuple[Transform, dataclasses.Field]]) -> None:
    hints = [_base_type(typing.get_type_hints(record.options)[item.name]) for record, _ in users]
    if any(hint != hints[0] for hint in hints):
        raise TypeError(
            f"option {item.name!r} has different types in transforms {[r.name for r, _ in users]}"
        )
    hint = hints[0]
    help_text = item.metadata["help"]
    if len(users) > 1:
        help_text += f" [--to {', '.join(record.name for record, _ in users)}]"
    if hint is bool:
        default_true = any(field.default is True for _, field in users)
        action = argparse.BooleanOptionalAction if default_true else "store_true"
        group.add_argument(_flag(item.name), action=action, default=None, help=help_text)
        return
    defaults = {repr(field.default) for _, field in users if field.default is not dataclasses.MISSING}
    required = any(field.default is dataclasses.MISSING for _, field in users)
    if not required and len(defaults) == 1 and defaults != {"None"}:
        help_text += f" (default {defaults.pop()})"
    kwargs: dict = {"default": None, "help": help_text}
    if item.metadata.get("parse") is not None:
        kwargs["type"] = str  # read by the option's own parser, whose errors name the value (exit status 2)
    elif typing.get_origin(hint) is Literal:
        kwargs["choices"] = list(typing.get_args(hint))
    elif hint in (int, float, str):
        kwargs["type"] = hint
    group.add_argument(_flag(item.name), **kwargs)


def transform_options(args: argparse.Namespace, device=None, d_model: int = 0) -> dict:
    """The transform's keyword options from the command line (missing required ones are errors, and so
    are the flags of other transforms); ``device`` and ``d_model`` resolve ``--refine-steps auto``
    (device None: the CPU)."""
    record = TRANSFORMS[args.to]
    names = {item.name for item in record.fields()}
    foreign = [
        _flag(name) for name in _option_users() if name not in names and getattr(args, name, None) is not None
    ]
    if foreign:
        raise ValueError(f"--to {args.to} takes no {', '.join(foreign)} (other transforms' options)")
    for name in COUNT_OPTIONS:  # a bad value is named before any missing option is asked for
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise ValueError(f"{_flag(name)} {value}: must be a positive integer")
    for name in record.required():
        if getattr(args, name, None) is None:
            raise ValueError(f"--to {args.to} needs {_flag(name)}")
    options = {}
    for item in record.fields():
        value = getattr(args, item.name, None)
        if item.name in COMMAND_OPTIONS or value is None:
            continue
        parse = item.metadata.get("parse")
        options[item.name] = parse(value) if parse is not None else value
    if "refine_steps" in names:
        device = device if device is not None else torch.device("cpu")
        options["refine_steps"] = resolve_refine_steps(args.refine_steps, device, d_model)
    record.parse(options, "kvforge convert")
    return options


def run(args: argparse.Namespace) -> int:
    src, out = Path(args.src), Path(args.out)
    if out.exists() and not args.overwrite:  # before any reading
        raise FileExistsError(f"{out} already exists; pass --overwrite to replace it")
    calibration = None if args.calib == "none" else args.calib
    if calibration not in (None, "self") and not Path(calibration).is_file():
        raise FileNotFoundError(f"--calib {args.calib}: no such file (or pass 'self' or 'none')")
    console = Console(highlight=False)
    src = gguf.model_directory(src, log=console.print)  # a .gguf file: its import, cached
    device = resolve_device(args.device)
    config = load_config(src)[0]
    source_check(args.to, config)  # a source no options could convert, before asking for options
    options = transform_options(args, device, config.d_model)

    def announce(start: ConversionStart) -> None:
        """Start-up lines, printed once SRC's config, the options and the weight headers passed every check."""
        if start.noop:
            message = (
                f"nothing to change: --to {args.to} leaves {src} as it is (its config is already the target)"
            )
            if args.fail_if_noop:
                raise NothingToChange(message + " (--fail-if-noop: nothing written)")
            console.print(f"{message}; writing an unchanged copy (no calibration)")
            return
        if start.calibrates:
            what = (
                f"{args.calib_tokens} tokens sampled from {src} (seed {args.seed})"
                if calibration == "self"
                else calibration
            )
            console.print(f"Calibration: {what}; converting one layer at a time on {device}")
            if "refine_steps" in options:
                source = (
                    "--refine-steps auto on " + device.type
                    if args.refine_steps == "auto"
                    else "--refine-steps"
                )
                console.print(f"Refinement: {options['refine_steps']} Adam steps per layer ({source})")

    try:
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
            progress=True,
            on_ready=announce,
        )
    except NothingToChange as stop:
        print(f"kvforge convert: {stop}", file=sys.stderr)
        return NOOP_EXIT
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
    if plan.family.stock and (mismatch := tokenizer_mismatch(src, out)):
        console.print(f"[bold red]WARNING:[/] {mismatch}")
    return 0
