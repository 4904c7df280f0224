"""Generate text from a model directory or a training checkpoint. On a GPU the fixed-shape decode loop runs (static KV cache,
the step captured once in a CUDA graph and replayed per token); on CPU the dynamic cache, unless
``--decode static``.

    kvforge generate MODEL_DIR --prompt "Once upon a time" [--max-new-tokens 64 --temperature 0.8 --top-k 50]
    kvforge generate MODEL_DIR --ids 1,403,407 --print-ids

Prints the prompt and its continuation on stdout, and a tokens/s line on stderr.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from kvforge.arch import StaticDecoder, generate
from kvforge.conversion.loading import load_for_eval, resolve_device, resolve_dtype


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "model", help="a model directory, a Lightning .ckpt file or an FSDP2 checkpoint directory"
    )
    prompt = parser.add_mutually_exclusive_group()
    prompt.add_argument("--prompt", help="prompt text, tokenized with the directory's tokenizer (BOS added)")
    prompt.add_argument("--ids", help="prompt token ids, comma-separated (default: the BOS token alone)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument("--num-samples", type=int, default=1, help="continuations decoded together (batch)")
    parser.add_argument(
        "--eos-id",
        type=int,
        nargs="+",
        default=None,
        help="stop token id(s): any of them ends a sample (default: the model's eos, every id it lists)",
    )
    parser.add_argument("--ignore-eos", action="store_true", help="always generate --max-new-tokens tokens")
    parser.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:1, ...")
    parser.add_argument(
        "--dtype",
        default="auto",
        help="weights and cache: auto (bf16 on CUDA, fp32 on CPU), fp32, bf16, fp16",
    )
    parser.add_argument(
        "--backend", default="auto", help="attention backend (kvforge.kernels), e.g. sdpa, flex"
    )
    parser.add_argument(
        "--decode",
        choices=("auto", "static", "dynamic"),
        default="auto",
        help="static: fixed-shape cache and step (CUDA graph on GPU); dynamic: the growing cache; "
        "auto: static on CUDA, dynamic on CPU (without a graph to replay, attending over the whole "
        "static buffer only costs time)",
    )
    parser.add_argument("--no-cuda-graph", action="store_true", help="static decode without graph capture")
    parser.add_argument("--compile", action="store_true", help="torch.compile the static decode step")
    parser.add_argument("--print-ids", action="store_true", help="print token ids instead of text")


def _prompt_ids(args: argparse.Namespace, tokenizer, bos_token_id: int | None) -> list[int]:
    if args.ids is not None:
        try:
            return [int(piece) for piece in args.ids.split(",") if piece.strip()]
        except ValueError as err:
            raise ValueError(f"--ids={args.ids!r}: expected comma-separated integers like 1,403,407") from err
    if args.prompt is not None:
        if tokenizer is None:
            raise FileNotFoundError(f"{args.model} has no tokenizer files; pass the prompt as --ids")
        return tokenizer.encode(args.prompt, add_special_tokens=True)
    if bos_token_id is None:
        raise ValueError("the model config has no bos_token_id; give --prompt or --ids")
    return [bos_token_id]


def _eos_id(args: argparse.Namespace, config) -> int | list[int] | None:
    """The stop ids: ``--eos-id``, else every id the model's ``eos_token_id`` lists (Llama-3 lists several)."""
    if args.ignore_eos:
        return None
    return args.eos_id if args.eos_id is not None else config.eos_token_id


def run(args: argparse.Namespace) -> int:
    for name in ("max_new_tokens", "num_samples"):
        if getattr(args, name) <= 0:
            raise ValueError(f"--{name.replace('_', '-')}={getattr(args, name)} must be positive")
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    loaded = load_for_eval(args.model, device=device, dtype=dtype, backend=args.backend)
    model, tokenizer, config = loaded.model, loaded.tokenizer, loaded.model.config
    prompt = _prompt_ids(args, tokenizer, config.bos_token_id)
    input_ids = torch.tensor([prompt] * args.num_samples, device=device)
    total = input_ids.shape[1] + args.max_new_tokens
    decoder = None
    mode = args.decode if args.decode != "auto" else ("static" if device.type == "cuda" else "dynamic")
    if mode == "static":
        cuda_graph = device.type == "cuda" and not args.no_cuda_graph
        decoder = StaticDecoder(model, args.num_samples, total, cuda_graph=cuda_graph, compile=args.compile)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    start = time.perf_counter()
    tokens = generate(
        model,
        input_ids,
        args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        eos_token_id=_eos_id(args, config),
        generator=generator,
        decoder=decoder,
    )
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    for row in tokens.tolist():
        print(
            ",".join(map(str, row))
            if args.print_ids or tokenizer is None
            else tokenizer.decode(row, skip_special_tokens=True)
        )
    new_tokens = (tokens.shape[1] - input_ids.shape[1]) * args.num_samples
    captured = decoder is not None and decoder.cuda_graph
    print(
        f"{new_tokens} new tokens in {seconds:.2f} s ({new_tokens / seconds:,.1f} tokens/s incl. prefill"
        f"{' and graph capture' if captured else ''}; {mode} decode{', CUDA graph' if captured else ''}, "
        f"{device.type}, {str(dtype).removeprefix('torch.')})",
        file=sys.stderr,
    )
    return 0
