"""Evaluation memory does not grow with the vocabulary: the NLL never holds the full logits.

A random model with Gemma 3's 262,144-token vocabulary and one with 512 tokens are scored in one
subprocess at the default batch (8 windows); each adds the same bounded amount to the process's peak
resident memory (``ru_maxrss``). Materialising the logits of 8 × 128 tokens would add 1 GiB in
float32 for the large vocabulary alone, and as much again for the loss's log-softmax."""

from __future__ import annotations

import subprocess
import sys

PROBE = """
import resource, sys, torch
from kvforge.arch import CausalLM, ModelConfig
from kvforge.arch.evaluate import windowed_nll
torch.set_num_threads(1)
peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
for vocab in (512, 262_144):
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=vocab, d_model=64, n_layers=2, n_heads=4, max_seq_len=128, tie_embeddings=True)
    model = CausalLM(config).eval()
    ids = torch.randint(0, vocab, (8 * 128 + 1,))
    before = peak()
    result = windowed_nll(model, ids, window=128)
    print(vocab, result.n_predicted, round(peak() - before))
"""

# MiB an evaluation may add to the process's peak: the activations of 8 x 128 tokens and one 64 MiB logit
# block with its temporaries. The 512-token vocabulary stays far under it; the full logits would not.
EVAL_GROWTH_BOUND_MIB = 256


def test_eval_peak_memory_is_the_same_bound_for_a_262k_vocabulary_as_for_512():
    out = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, check=True, timeout=300
    ).stdout
    growth = {int(vocab): (int(n), int(mib)) for vocab, n, mib in (line.split() for line in out.splitlines())}
    assert growth[512][0] == growth[262_144][0] == 8 * 128
    for vocab, (_, mib) in growth.items():
        assert mib <= EVAL_GROWTH_BOUND_MIB, f"vocab {vocab}: evaluation added {mib} MiB to the peak"
