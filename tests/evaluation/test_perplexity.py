"""Perplexity: the data README's numbers, transformers' own loss, and a hand-computed strided NLL."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kvforge.arch import CausalLM
from kvforge.conversion.transforms import to_window
from kvforge.evaluation import (
    Corpus,
    default_contexts,
    load_corpus,
    perplexity,
    perplexity_vs_context,
)
from tests.conftest import shared_path, tiny_form
from tests.evaluation.helpers import TINYSTORIES, stories260k

README_QUICK_CHECK = 1.3217  # shared/data/README.md: first 4,097 tokens, 8 windows of 512
README_FULL_FILE = 1.6191  # the whole tinystories_val_prefix.txt in 512-token windows
TOLERANCE = 0.01  # nats/token, the tolerance; observed agreement is ~1e-4


def test_stories260k_quick_check_matches_the_data_readme():
    loaded = stories260k()
    corpus = load_corpus(shared_path(*TINYSTORIES), loaded.tokenizer, max_tokens=4097)
    row = perplexity(loaded.model, corpus, context=512)
    assert (row.n_tokens, row.n_predicted) == (4097, 4096)
    assert abs(row.nll - README_QUICK_CHECK) <= TOLERANCE


@pytest.mark.slow
def test_stories260k_full_file_matches_the_data_readme():
    loaded = stories260k()
    corpus = load_corpus(shared_path(*TINYSTORIES), loaded.tokenizer)
    row = perplexity(loaded.model, corpus, context=512, batch_size=32)
    assert (row.n_tokens, row.n_predicted) == (393012, 393011)
    assert abs(row.nll - README_FULL_FILE) <= TOLERANCE


def test_stories260k_perplexity_matches_transformers_loss_on_the_same_windows():
    transformers = pytest.importorskip("transformers")
    loaded = stories260k()
    corpus = load_corpus(shared_path(*TINYSTORIES), loaded.tokenizer, max_tokens=2049)
    ours = perplexity(loaded.model, corpus, context=512)
    reference = transformers.AutoModelForCausalLM.from_pretrained(
        shared_path("stories260K"), dtype=torch.float32
    )
    windows = corpus.ids[:2048].view(4, 512)
    targets = corpus.ids[1:2049].view(4, 512)
    with torch.no_grad():
        logits = reference(windows).logits
    theirs = F.cross_entropy(logits.transpose(1, 2), targets).item()
    assert abs(ours.nll - theirs) <= 1e-4


def _hand_computed_nll(model: CausalLM, ids: torch.Tensor, window: int, stride: int) -> float:
    """Each target j is predicted from ids[s:j], s the start of the first window that scores it:
    0 while j fits in the first window, else the first multiple of `stride` with j - s <= window.
    One forward pass per target, nothing batched or shared."""
    total = 0.0
    for j in range(1, ids.numel()):
        start = 0 if j <= window else math.ceil((j - window) / stride) * stride
        with torch.no_grad():
            logits = model(ids[start:j][None])[0, -1]
        total -= torch.log_softmax(logits.double(), -1)[ids[j]].item()
    return total / (ids.numel() - 1)


@pytest.mark.parametrize(("window", "stride"), [(8, 8), (8, 3), (8, 1), (5, 4)])
def test_strided_nll_equals_hand_computed_nll_on_a_toy_model(window, stride):
    model = CausalLM(tiny_form("gqa")).eval()
    ids = torch.randint(0, model.config.vocab_size, (23,))
    row = perplexity(model, Corpus("toy", ids, ids.numel()), context=window, stride=stride, batch_size=3)
    assert row.n_predicted == 22
    assert row.nll == pytest.approx(_hand_computed_nll(model, ids, window, stride), abs=1e-5)


def test_windowed_form_matches_its_source_up_to_the_window_and_departs_beyond():
    loaded = stories260k()
    corpus = load_corpus(shared_path(*TINYSTORIES), loaded.tokenizer, max_tokens=2049)
    source = perplexity_vs_context(loaded.model, corpus, [32, 64, 256])
    config, state_dict = to_window(loaded.model.config, loaded.model.state_dict(), windows=64)
    windowed = CausalLM(config).eval()
    windowed.load_state_dict(state_dict)
    curve = perplexity_vs_context(windowed, corpus, [32, 64, 256])
    assert [r.nll for r in curve[:2]] == pytest.approx([r.nll for r in source[:2]], abs=1e-5)
    assert abs(curve[2].nll - source[2].nll) > 1e-3


def test_default_contexts_are_powers_of_two_up_to_max_positions():
    assert default_contexts(512) == [128, 256, 512]
    assert default_contexts(600) == [128, 256, 512, 600]


def test_context_longer_than_the_model_supports_is_a_clear_error():
    model = CausalLM(tiny_form("gqa"))
    ids = torch.arange(100) % 50
    with pytest.raises(ValueError, match=r"context=65 is outside 1\.\.64.*max_seq_len=64"):
        perplexity(model, Corpus("toy", ids, 100), context=65)


def test_stride_longer_than_the_context_is_a_clear_error():
    model = CausalLM(tiny_form("gqa"))
    ids = torch.arange(100) % 50
    with pytest.raises(ValueError, match=r"stride=40 must be in 1\.\.context=32"):
        perplexity(model, Corpus("toy", ids, 100), context=32, stride=40)
