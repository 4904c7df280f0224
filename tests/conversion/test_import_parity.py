"""Import of every family: kvforge computes what transformers computes on the same directory.

Each variant is a tiny random model built and saved by transformers itself (fp32). Logits must match
to 1e-4 (max abs; most variants are bit-identical) and greedy generations token for token, with
prompts + continuations longer than the 5-token sliding windows.
"""

from __future__ import annotations

import pytest
import torch

from kvforge.arch import CausalLM, generate
from kvforge.conversion import load_pretrained
from tests.conversion.hf_tiny import VARIANTS, VOCAB, load_hf, save_hf_model

LOGITS_ATOL = 1e-4


def kvforge_model(pretrained) -> CausalLM:
    model = CausalLM(pretrained.config).eval()
    model.load_state_dict(pretrained.state_dict)
    return model


def token_ids(batch: int, seq: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module", params=list(VARIANTS))
def imported(request, tmp_path_factory):
    path = save_hf_model(request.param, tmp_path_factory.mktemp(request.param) / "hf")
    return load_hf(path), load_pretrained(path)


def test_import_matches_transformers_logits(imported):
    hf_model, pretrained = imported
    ids = token_ids(2, 24)
    with torch.no_grad():
        expected = hf_model(ids).logits
        actual = kvforge_model(pretrained)(ids)
    assert (actual - expected).abs().max().item() <= LOGITS_ATOL


def test_import_matches_transformers_greedy_generation(imported):
    hf_model, pretrained = imported
    prompt = token_ids(1, 6, seed=2)
    expected = hf_model.generate(prompt, max_new_tokens=20, do_sample=False, eos_token_id=None)
    assert generate(kvforge_model(pretrained), prompt, 20).tolist() == expected.tolist()
