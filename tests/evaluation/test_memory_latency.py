"""KV bytes measured from a real generation equal the analytic figure for every form; the probe's
tokens are the ones `generate` produces; latency rows cover the requested grid."""

from __future__ import annotations

import pytest
import torch

from kvforge.arch import CausalLM, StaticDecoder, generate, kv_cache_bytes
from kvforge.arch.presets import PRESETS
from kvforge.training.evaluation import measure_decode
from kvforge.training.evaluation.decode_probe import allocated_cache_bytes, run_probe
from tests.conftest import tiny_form


@pytest.mark.parametrize("form", PRESETS)
def test_measured_cache_bytes_equal_the_analytic_figure(form):
    model = CausalLM(tiny_form(form)).eval()
    _, memory = measure_decode(model, batches=[2], contexts=[12, 40], decode_steps=3, repeats=1)
    for row in memory:
        assert row.measured_cache_bytes == kv_cache_bytes(model.config, row.context, torch.float32, 2)
        assert row.matches_analytic


def test_layers_sharing_kv_are_counted_once():
    model = CausalLM(tiny_form("cla")).eval()
    cache = model.new_cache(1, 16)
    assert cache.entries[1] is cache.entries[0]
    owned = sum(b.numel() * b.element_size() for i in (0, 2) for b in cache.entries[i].buffers)
    assert allocated_cache_bytes(cache) == owned


def test_probe_decodes_the_same_tokens_as_generate():
    model = CausalLM(tiny_form("swa")).eval()
    prompt = torch.randint(0, model.config.vocab_size, (2, 9))
    probe = run_probe(model, prompt, decode_steps=6)
    expected = generate(model, prompt, max_new_tokens=7, use_cache=False)[:, 9:]
    assert torch.equal(probe.generated_ids, expected)
    assert probe.cached_tokens == 15


def test_latency_rows_cover_every_batch_and_context():
    model = CausalLM(tiny_form("gqa")).eval()
    latency, memory = measure_decode(model, batches=[1, 3], contexts=[16, 32], decode_steps=4, repeats=2)
    assert [(r.batch, r.context, r.prompt_tokens) for r in latency] == [
        (1, 16, 12),
        (1, 32, 28),
        (3, 16, 12),
        (3, 32, 28),
    ]
    assert [(r.batch, r.context) for r in memory] == [(r.batch, r.context) for r in latency]
    assert all(r.decode_tokens_per_s > 0 and r.prefill_tokens_per_s > 0 for r in latency)


def test_peak_memory_is_reported_only_where_torch_tracks_it():
    model = CausalLM(tiny_form("gqa")).eval()
    _, memory = measure_decode(model, batches=[1], contexts=[16], decode_steps=2, repeats=1)
    assert memory[0].peak_memory_bytes is None  # CPU: no allocator statistics
    assert memory[0].process_peak_rss_bytes > 0


@pytest.mark.parametrize(
    ("options", "match"),
    [
        (dict(contexts=[65]), r"latency contexts=65 is outside 1\.\.64"),
        (dict(contexts=[4]), r"latency context 4 must exceed decode_steps=4"),
        (dict(batches=[0]), r"batch sizes \[0\] must all be at least 1"),
    ],
)
def test_bad_latency_settings_are_clear_errors(options, match):
    model = CausalLM(tiny_form("gqa")).eval()
    arguments = dict(batches=[1], contexts=[16], decode_steps=4, repeats=1) | options
    with pytest.raises(ValueError, match=match):
        measure_decode(model, **arguments)


def test_probe_through_a_static_decoder_decodes_the_same_tokens():
    # The path the probe takes on CUDA (there with a CUDA graph), run eagerly on CPU.
    model = CausalLM(tiny_form("mix")).eval()
    prompt = torch.randint(0, model.config.vocab_size, (2, 9))
    decoder = StaticDecoder(model, 2, 15, cuda_graph=False)
    probe = run_probe(model, prompt, decode_steps=6, decoder=decoder)
    expected = generate(model, prompt, max_new_tokens=7, use_cache=False)[:, 9:]
    assert torch.equal(probe.generated_ids, expected)
    assert probe.cache_bytes == kv_cache_bytes(model.config, 15, torch.float32, 2)
