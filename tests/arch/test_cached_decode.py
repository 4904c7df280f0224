"""Cached decoding must reproduce one uncached forward pass exactly (fp32, ≤ 1e-5)."""

from __future__ import annotations

import pytest
import torch

from kvforge.arch import CausalLM, generate
from kvforge.arch.presets import PRESETS
from tests.conftest import tiny_form

TOL = 1e-5


def _cached_logits(
    model: CausalLM, ids: torch.Tensor, chunks: list[int], dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Feed ``ids`` through the cache in blocks of the given sizes (1 = token by token)."""
    cache = model.new_cache(ids.shape[0], ids.shape[1], dtype=dtype)
    outs, pos = [], 0
    for size in chunks:
        outs.append(model(ids[:, pos : pos + size], cache=cache))
        pos += size
    assert pos == ids.shape[1] and cache.length == pos
    return torch.cat(outs, dim=1)


def _cached_error(form: str, chunks: list[int]) -> float:
    """Largest |cached - uncached| logit of 20 random tokens through a tiny ``form`` model."""
    model = CausalLM(tiny_form(form)).eval()
    ids = torch.randint(0, 97, (2, 20))
    with torch.no_grad():
        return (_cached_logits(model, ids, chunks) - model(ids)).abs().max().item()


@pytest.mark.parametrize("form", PRESETS)
def test_token_by_token_decode_matches_uncached_forward(form):
    # 20 tokens with window 5: the ring buffers wrap several times.
    assert _cached_error(form, [1] * 20) <= TOL


@pytest.mark.parametrize("form", PRESETS)
def test_prefill_then_blocks_then_tokens_matches_uncached_forward(form):
    # A 7-token prefill (longer than the window), a 3-token block over a wrapped ring, then single tokens.
    assert _cached_error(form, [7, 3, 1, 1, 6, 1, 1]) <= TOL


@pytest.mark.parametrize("form", PRESETS)
def test_a_bf16_cache_under_an_fp32_model_decodes_every_form(form):
    """``--cache-dtype bf16`` (eval, generate) on an fp32 model: every cache kind stores bf16 (ring and
    chunk buffers included, which once refused the fp32 keys) and stays close to the fp32 answer."""
    model = CausalLM(tiny_form(form)).eval()
    ids = torch.randint(0, 97, (2, 20))
    with torch.no_grad():
        reference = model(ids)
        cached = _cached_logits(model, ids, [7, 3, 1, 1, 6, 1, 1], dtype=torch.bfloat16)
    assert cached.dtype == torch.float32
    assert (cached - reference).abs().max().item() <= 0.05 * reference.abs().max().item()


@pytest.mark.parametrize("absorb", ["always", "never"])
@pytest.mark.parametrize("form", ["mla", "mix"])
def test_mla_decode_matches_in_both_absorbed_and_expanded_modes(form, absorb):
    model = CausalLM(tiny_form(form, mla_absorb=absorb)).eval()
    ids = torch.randint(0, 97, (1, 18))
    with torch.no_grad():
        reference = model(ids)
        cached = _cached_logits(model, ids, [4] + [1] * 14)
    assert (cached - reference).abs().max().item() <= TOL


@pytest.mark.parametrize("form", ["gqa", "mla", "mix"])
def test_greedy_generation_with_cache_equals_without(form):
    model = CausalLM(tiny_form(form)).eval()
    prompt = torch.randint(0, 97, (2, 4))
    cached = generate(model, prompt, 16)
    uncached = generate(model, prompt, 16, use_cache=False)
    assert torch.equal(cached, uncached)


def test_decode_with_explicit_positions_equals_default_positions():
    model = CausalLM(tiny_form("gqa")).eval()
    ids = torch.randint(0, 97, (1, 9))
    with torch.no_grad():
        default = model(ids)
        explicit = model(ids, positions=torch.arange(9).unsqueeze(0))
    assert torch.equal(default, explicit)


def test_cache_overflow_is_a_clear_error():
    model = CausalLM(tiny_form("gqa")).eval()
    cache = model.new_cache(1, 4)
    with pytest.raises(ValueError, match="max_len=4"):
        model(torch.zeros(1, 5, dtype=torch.long), cache=cache)
