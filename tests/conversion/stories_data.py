"""The real checkpoints and text slices the transform tests share (loaded once per session).

Calibration ids come from botchan.txt, evaluation ids from tinystories_val_prefix.txt: calibration
text is never the evaluation text."""

from __future__ import annotations

import functools

import torch

from kvforge.arch import CausalLM
from kvforge.arch.evaluate import windowed_nll
from kvforge.conversion import Pretrained, load_pretrained
from tests.conftest import shared_path


@functools.cache
def stories(name: str = "stories260K") -> Pretrained:
    return load_pretrained(shared_path(name))


@functools.cache
def _tokens(corpus: str, n_tokens: int) -> torch.Tensor:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(shared_path("stories260K"))
    text = shared_path("corpora", corpus).read_text(encoding="utf-8-sig")[: 8 * n_tokens]
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"][:n_tokens]
    assert len(ids) == n_tokens, f"{corpus}: only {len(ids)} tokens in the slice"
    return torch.tensor(ids)


def calibration_ids(rows: int = 4, seq_len: int = 256) -> torch.Tensor:
    """``(rows, seq_len)`` ids of botchan.txt."""
    return _tokens("botchan.txt", rows * seq_len).view(rows, seq_len)


def evaluation_ids(n_tokens: int = 4097) -> torch.Tensor:
    """The first ``n_tokens`` of the TinyStories prefix (8 windows of 512 by default)."""
    return _tokens("tinystories_val_prefix.txt", n_tokens)


def model_of(config, state_dict) -> CausalLM:
    model = CausalLM(config).eval()
    model.load_state_dict(state_dict)
    return model


def loss(config, state_dict, n_tokens: int = 4097) -> float:
    """Mean NLL (the data README's procedure) on a TinyStories slice."""
    return windowed_nll(model_of(config, state_dict), evaluation_ids(n_tokens)).mean


def logits(config, state_dict, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model_of(config, state_dict)(ids)
