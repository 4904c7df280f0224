"""Training and cached-decode tokens/s of kvforge vs ``transformers.LlamaForCausalLM`` with the same
shape and the same weights, measured in the same run (CPU by default).

    python benchmarks/throughput.py [--d-model 256 --layers 4 --batch 8 --seq 256 ...]

Prints a table and the ratio kvforge / transformers (targets: ≥ 1.2× training, ≥ 1.5× decode).
"""

from __future__ import annotations

import argparse

import torch
import transformers

from benchmarks.common import print_table, timed
from benchmarks.stock import build_stock
from kvforge.arch import CausalLM, ModelConfig, generate


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--ffn", type=int, default=704)
    parser.add_argument("--batch", type=int, default=8, help="training batch")
    parser.add_argument("--seq", type=int, default=256, help="training sequence length")
    parser.add_argument("--decode-batch", type=int, default=1)
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)"
    )
    parser.add_argument("--markdown", action="store_true", help="also print the table as Markdown")
    return parser.parse_args()


def build_pair(args: argparse.Namespace) -> tuple[CausalLM, transformers.LlamaForCausalLM]:
    max_len = max(args.seq, args.prompt + args.new_tokens)
    config = ModelConfig(
        vocab_size=args.vocab,
        d_model=args.d_model,
        n_layers=args.layers,
        n_heads=args.heads,
        n_kv_heads=args.kv_heads,
        ffn_dim=args.ffn,
        max_seq_len=max_len,
    )
    ours = CausalLM(config)
    theirs = build_stock(config)
    theirs.load_state_dict(ours.state_dict())  # same names, same weights
    return ours, theirs


def train_step_fn(model, ids, optimizer, hf: bool):
    """One optimizer step through each library's own training loss path."""
    inputs, targets = ids[:, :-1].contiguous(), ids[:, 1:].contiguous()

    def step():
        optimizer.zero_grad(set_to_none=True)
        if hf:
            loss = model(input_ids=inputs, labels=targets, shift_labels=targets).loss
        else:
            loss = model.loss(inputs, targets)
        loss.backward()
        optimizer.step()

    return step


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    ours, theirs = build_pair(args)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq + 1))
    rows = []

    train_tokens = args.batch * args.seq
    times = {}
    for name, model, hf in (("transformers", theirs, True), ("kvforge", ours, False)):
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        times[name] = timed(train_step_fn(model, ids, optimizer, hf), repeats=args.repeats)
    train_ratio = times["transformers"] / times["kvforge"]
    for name in ("transformers", "kvforge"):
        rows.append([f"train fwd+bwd+AdamW ({args.batch}×{args.seq})", name, train_tokens / times[name], ""])
    rows[-1][-1] = f"{train_ratio:.2f}×"

    prompt = torch.randint(0, args.vocab, (args.decode_batch, args.prompt))
    ours.eval()
    theirs.eval()

    @torch.no_grad()
    def hf_decode():
        theirs.generate(
            prompt,
            max_new_tokens=args.new_tokens,
            min_new_tokens=args.new_tokens,
            do_sample=False,
            pad_token_id=0,
            attention_mask=torch.ones_like(prompt),
        )

    def our_decode():
        generate(ours, prompt, args.new_tokens)

    decode = {
        "transformers": timed(hf_decode, repeats=args.repeats),
        "kvforge": timed(our_decode, repeats=args.repeats),
    }
    decode_ratio = decode["transformers"] / decode["kvforge"]
    new_tokens = args.decode_batch * args.new_tokens
    for name in ("transformers", "kvforge"):
        rows.append(
            [
                f"greedy decode (batch {args.decode_batch}, {args.prompt}+{args.new_tokens})",
                name,
                new_tokens / decode[name],
                "",
            ]
        )
    rows[-1][-1] = f"{decode_ratio:.2f}×"

    columns = ["measurement", "implementation", "tokens/s", "kvforge / transformers"]
    shape = f"d={args.d_model}, L={args.layers}, {args.heads}q/{args.kv_heads}kv heads, ffn {args.ffn}, vocab {args.vocab}"
    print_table(
        f"Throughput on {'CUDA' if torch.cuda.is_available() else 'CPU'} ({shape}, {torch.get_num_threads()} threads)",
        columns,
        rows,
        markdown=args.markdown,
    )


if __name__ == "__main__":
    main()
