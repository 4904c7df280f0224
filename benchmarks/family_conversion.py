"""Qwen2 biases and Qwen3 q/k norm through to_gqa (aligned) and to_mla, against mean-pooling (issue 16).

    python -m benchmarks.family_conversion [--distill-steps 300] [--calib-tokens 4096] [--markdown]

Two kinds of source, every conversion scored on its zero-shot NLL and on the KL divergence from the
source's next-token distribution (the signal a random model still has):

1. ``tiny-qwen2`` / ``tiny-qwen3``: tiny random models transformers itself builds (the shapes the
   tests use; norms and biases randomised), scored on a fixed token text. Their NLL sits near
   ln(vocab) whatever the conversion does: read the KL column.
2. ``stories-qk-norm``: no trained Qwen3 checkpoint exists in shared/data, so this is the trained
   stories260K (Llama) given Qwen3's per-head q/k RMSNorm and distilled back to stories260K's logits
   on text sampled from stories260K (``--distill-steps`` Adam steps), then scored like
   ``conversion_quality`` (windowed NLL over the whole tinystories_val_prefix.txt).

Calibration: text sampled from each source itself (``sample_calibration_ids``), never the eval text.
Rows at equal cache size: ``gqa-2`` (2 K/V heads) and ``mla`` (rank + rope dims = the same floats).
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import torch

from benchmarks.common import print_table
from benchmarks.tiny_hf import SIZES, VOCAB, randomize_

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
TINY = dict(SIZES, num_key_value_heads=8, max_position_embeddings=512)


def tiny_source(family: str):
    """A random tiny Qwen2 (biases) or Qwen3 (q/k norm, head_dim 16) built by transformers."""
    import tempfile

    import transformers

    from kvforge.conversion import load_pretrained

    config_class, extra = {
        "qwen2": (transformers.Qwen2Config, {}),
        "qwen3": (transformers.Qwen3Config, {"head_dim": 16}),
    }[family]
    model = transformers.AutoModelForCausalLM.from_config(config_class(**TINY, **extra), dtype=torch.float32)
    randomize_(model)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        return load_pretrained(tmp)


def stories_with_qk_norm(steps: int, seed: int = 1):
    """stories260K with per-head q/k RMSNorm, distilled to stories260K's logits on its own samples."""
    from kvforge.arch import CausalLM
    from kvforge.conversion import load_pretrained
    from kvforge.conversion.transforms import sample_calibration_ids

    teacher_source = load_pretrained(DATA / "stories260K")
    teacher = CausalLM(teacher_source.config).eval()
    teacher.load_state_dict(teacher_source.state_dict)
    config = dataclasses.replace(teacher_source.config, qk_norm=True)
    student = CausalLM(config)
    student.load_state_dict(teacher_source.state_dict, strict=False)
    text = sample_calibration_ids(teacher_source.config, teacher_source.state_dict, 64 * 256, 256, seed)
    # Start each norm's gain at its input's typical rms (norm(y)·g ≈ y), read from the teacher's q/k.
    gains: dict[str, float] = {}
    hooks = [
        module.register_forward_hook(
            lambda mod, args, out, name=name: gains.__setitem__(name, float(out.pow(2).mean().sqrt()))
        )
        for name, module in teacher.named_modules()
        if name.endswith(("q_proj", "k_proj"))
    ]
    with torch.no_grad():
        teacher(text[:8])
        for hook in hooks:
            hook.remove()
        for name, module in student.named_modules():
            if name.endswith(("q_norm", "k_norm")):
                module.weight.fill_(gains[name.replace("_norm", "_proj")])
    optimizer = torch.optim.Adam(student.parameters(), lr=2e-3)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        batch = text[torch.randint(len(text), (8,), generator=generator)]
        with torch.no_grad():
            target = teacher(batch).log_softmax(-1)
        log_probs = student(batch).log_softmax(-1)
        loss = torch.nn.functional.kl_div(log_probs, target, log_target=True, reduction="batchmean")
        optimizer.zero_grad(set_to_none=True)
        (loss / batch.shape[1]).backward()
        optimizer.step()
        schedule.step()
    return config, {k: v.detach() for k, v in student.state_dict().items()}


def conversions(head_dim: int, rope_dims: int):
    """(form, method, build) rows; ``build(config, state_dict, calibration)``."""
    from kvforge.conversion.transforms import to_gqa, to_mla

    rank = 2 * 2 * head_dim - rope_dims  # mla at the cache size of gqa-2
    return [
        ("source", "-", lambda c, s, x: (c, s)),
        ("gqa-2", "mean-pool", lambda c, s, x: to_gqa(c, s, n_kv_heads=2, method="mean")),
        ("gqa-2", "aligned, calibrated", lambda c, s, x: to_gqa(c, s, x, n_kv_heads=2)),
        (
            f"mla {rank}+{rope_dims}",
            "deepseek layout, calibrated",
            lambda c, s, x: to_mla(c, s, x, kv_lora_rank=rank, rope_dims=rope_dims),
        ),
    ]


def score(config, state_dict, eval_ids: torch.Tensor, reference: torch.Tensor | None):
    """(NLL, KL from the reference distribution, logits) of a model on ``eval_ids`` (1, T)."""
    from kvforge.arch import CausalLM

    model = CausalLM(config).eval()
    model.load_state_dict(state_dict)
    with torch.no_grad():
        logits = model(eval_ids).log_softmax(-1)
    nll = torch.nn.functional.nll_loss(logits[0, :-1], eval_ids[0, 1:]).item()
    kl = 0.0 if reference is None else float((reference.exp() * (reference - logits)).sum(-1).mean())
    return nll, kl, logits


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--distill-steps", type=int, default=300)
    parser.add_argument("--calib-tokens", type=int, default=4096)
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()

    import logging

    from transformers import AutoTokenizer

    from kvforge.conversion.transforms import sample_calibration_ids

    logging.getLogger("kvforge.conversion").setLevel(logging.ERROR)
    torch.manual_seed(0)
    tiny_text = torch.arange(256).remainder(VOCAB).mul(37).remainder(VOCAB).view(1, 256)
    tokenizer = AutoTokenizer.from_pretrained(DATA / "stories260K")
    text = (DATA / "corpora" / "tinystories_val_prefix.txt").read_text(encoding="utf-8-sig")
    stories_text = torch.tensor(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
    stories_text = stories_text[: stories_text.numel() // 512 * 512].view(-1, 512)

    started = time.process_time()
    distill = time.process_time()
    stories = stories_with_qk_norm(args.distill_steps)
    print(f"stories-qk-norm distilled in {time.process_time() - distill:.1f} CPU s", flush=True)
    sources = [
        ("tiny-qwen2", *_pretrained(tiny_source("qwen2")), tiny_text, 4),
        ("tiny-qwen3", *_pretrained(tiny_source("qwen3")), tiny_text, 8),
        ("stories-qk-norm", *stories, stories_text, 8),
    ]
    table = []
    for name, config, state_dict, eval_ids, rope_dims in sources:
        start = time.process_time()
        calibration = sample_calibration_ids(config, state_dict, args.calib_tokens, 256)
        print(f"{name}: ready, calibration sampled in {time.process_time() - start:.1f} CPU s", flush=True)
        reference = None
        for form, method, build in conversions(config.head_dim, rope_dims):
            start = time.process_time()
            new_config, new_state = build(config, state_dict, calibration)
            nll, kl = _score_rows(new_config, new_state, eval_ids, reference)
            if reference is None:
                reference = _reference(config, state_dict, eval_ids)
            table.append(
                [name, form, method, f"{nll:.4f}", f"{kl:.4f}", f"{time.process_time() - start:.1f}"]
            )
            print(*table[-1], sep=" | ", flush=True)
    columns = ["source", "form", "method", "NLL", "KL from source", "CPU s"]
    print_table(
        "Qwen2 biases / Qwen3 q/k norm through to_gqa and to_mla", columns, table, markdown=args.markdown
    )
    print(f"total CPU seconds: {time.process_time() - started:.1f}")


def _pretrained(pretrained):
    return pretrained.config, pretrained.state_dict


def _reference(config, state_dict, eval_ids):
    return [score(config, state_dict, row[None], None)[2] for row in eval_ids]


def _score_rows(config, state_dict, eval_ids, reference):
    """Mean NLL and KL over the rows of ``eval_ids`` (each row one window)."""
    nlls, kls = [], []
    for index, row in enumerate(eval_ids):
        nll, kl, _ = score(config, state_dict, row[None], None if reference is None else reference[index])
        nlls.append(nll)
        kls.append(kl)
    return sum(nlls) / len(nlls), sum(kls) / len(kls)


if __name__ == "__main__":
    main()
