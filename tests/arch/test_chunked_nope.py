"""LayerSpec(chunk=C) and LayerSpec(rope=False): chunked local attention (Llama 4's
attention_chunk_size) and NoPE layers. A chunked model computes each chunk as if it were alone,
NoPE layers do not see absolute positions, cached decode equals the uncached forward (≤ 1e-5) and
a chunked layer caches at most C positions."""

from __future__ import annotations

import pytest
import torch

from kvforge.arch import CausalLM, ChunkLayerCache, LayerSpec, kv_cache_bytes
from tests.arch.test_cached_decode import TOL, _cached_logits
from tests.conftest import tiny_base, tiny_form


def test_all_chunked_model_computes_each_chunk_alone():
    model = CausalLM(tiny_base(pattern=[LayerSpec("gqa", 2, chunk=4)])).eval()
    ids = torch.randint(0, 97, (2, 12))
    with torch.no_grad():
        full = model(ids)
        for first in (0, 4, 8):
            alone = model(ids[:, first : first + 4], positions=torch.arange(first, first + 4))
            torch.testing.assert_close(full[:, first : first + 4], alone, rtol=1e-5, atol=1e-5)


def test_nope_layers_ignore_absolute_positions():
    model = CausalLM(tiny_base(pattern=[LayerSpec("gqa", 2, rope=False)])).eval()
    ids = torch.randint(0, 97, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(
            model(ids), model(ids, positions=torch.zeros(9, dtype=torch.long)), rtol=1e-5, atol=1e-5
        )
    roped = CausalLM(tiny_base(pattern=[LayerSpec("gqa", 2)])).eval()
    with torch.no_grad():
        assert (roped(ids) - roped(ids, positions=torch.zeros(9, dtype=torch.long))).abs().max() > 1e-4


@pytest.mark.parametrize(
    "chunks", [[1] * 23, [4, 1, 1, 1, 1, 9, 1, 5], [10, 13], [3, 3, 3, 3, 3, 3, 3, 2], [23]]
)
def test_chunked_nope_decode_matches_uncached_forward(chunks):
    # chunk 5 (tiny_form's window): blocks that end inside a chunk, on a boundary and across two chunks.
    model = CausalLM(tiny_form("chunked")).eval()
    ids = torch.randint(0, 97, (2, 23))
    with torch.no_grad():
        assert (_cached_logits(model, ids, chunks) - model(ids)).abs().max().item() <= TOL


def test_mla_layers_can_be_chunked():
    config = tiny_base(
        pattern=[LayerSpec("mla", chunk=4), LayerSpec("mla")],
        kv_lora_rank=24,
        qk_rope_head_dim=4,
        qk_nope_head_dim=8,
        v_head_dim=8,
    )
    model = CausalLM(config).eval()
    ids = torch.randint(0, 97, (1, 14))
    with torch.no_grad():
        assert (_cached_logits(model, ids, [5, 1, 1, 7]) - model(ids)).abs().max().item() <= TOL


@pytest.mark.parametrize("seq_len", [3, 5, 6, 40])
def test_chunk_cache_holds_at_most_chunk_positions(seq_len):
    config = tiny_form("chunked")
    cache = CausalLM(config).new_cache(2, seq_len, dtype=torch.float32)
    assert cache.nbytes() == kv_cache_bytes(config, seq_len, torch.float32, batch=2)
    chunked = [entry for entry, spec in zip(cache.entries, config.layers) if spec.chunk]
    assert all(isinstance(e, ChunkLayerCache) == (seq_len > 5) for e in chunked)
    per_position = 2 * 2 * 8 * 4 * 2  # K and V, 2 KV heads of 8 dims, fp32, batch 2
    assert kv_cache_bytes(config, 40, torch.float32, batch=2) == per_position * (3 * 5 + 40)


@pytest.mark.parametrize(
    ("pattern", "match"),
    [
        ([LayerSpec(chunk=0)], r"layers\[0\]\.chunk=0: must be a positive"),
        ([LayerSpec(chunk=4, window=4)], r"layers\[0\]\.chunk=4: this layer also has window=4"),
        (
            [LayerSpec("mla", rope=False)],
            r"layers\[0\]\.rope=False: NoPE is for gqa, linear, deltanet layers",
        ),
        ([LayerSpec(chunk=4), LayerSpec(kv_from=-1)], r"layers\[1\]\.kv_from=0: layer 0 has chunk=4"),
        ([LayerSpec(rope=False), LayerSpec(kv_from=-1)], r"layers\[1\]\.kv_from=0: layer 0 has rope=False"),
    ],
)
def test_invalid_chunk_and_rope_name_the_layer_and_field(pattern, match):
    with pytest.raises(ValueError, match=match):
        tiny_base(n_layers=2, kv_lora_rank=16, qk_rope_head_dim=4, pattern=pattern)
