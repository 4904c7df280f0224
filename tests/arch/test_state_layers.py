"""Constant-state layers (linear attention, Gated DeltaNet): exact decode, fixed bytes, mixes, documents."""

from __future__ import annotations

import pytest
import torch

from kvforge.arch import (
    CausalLM,
    LayerSpec,
    ModelConfig,
    StaticDecoder,
    describe_layers,
    generate,
    kv_cache_bytes,
)
from kvforge.arch.kv_bytes import layer_state_bytes, state_bytes
from tests.conftest import tiny_base

TOL = 1e-5


def _config(pattern, **overrides) -> ModelConfig:
    fields = {"kv_lora_rank": 24, "qk_rope_head_dim": 4, "pattern": pattern}
    fields.update(overrides)
    return tiny_base(**fields)


LAYOUTS = {
    "qwen3-next": [LayerSpec("deltanet", 2)] * 3 + [LayerSpec("gqa", 2)],
    "kimi-linear": [LayerSpec("deltanet", 8, conv_size=2)] * 3 + [LayerSpec("mla")],
    "deltanet-swa-global": [LayerSpec("deltanet", 4), LayerSpec("gqa", 2, window=5)] * 1
    + [LayerSpec("gqa", 2, window=5, kv_from=-1), LayerSpec("gqa", 2)],
    "lolcats": [LayerSpec("linear", 2, window=3, feature_dim=5), LayerSpec("linear", 8, window=1)] * 2,
    "linear-mla": [
        LayerSpec("linear", 1),
        LayerSpec("mla"),
        LayerSpec("deltanet", 1),
        LayerSpec("gla", n_latent_heads=2),
    ],
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_prefill_then_decode_equals_one_uncached_forward(layout):
    model = CausalLM(_config(LAYOUTS[layout])).eval()
    ids = torch.randint(0, 97, (2, 21))
    with torch.no_grad():
        reference = model(ids)
        cache = model.new_cache(2, 21, dtype=torch.float32)
        parts = [model(ids[:, :9], cache=cache)] + [
            model(ids[:, t : t + 1], cache=cache) for t in range(9, 14)
        ]
        parts.append(model(ids[:, 14:], cache=cache))  # a block after single tokens
    assert (torch.cat(parts, dim=1) - reference).abs().max().item() <= TOL


@pytest.mark.parametrize("layout", ["qwen3-next", "lolcats"])
def test_static_decoder_resets_the_state_between_prompts(layout):
    model = CausalLM(_config(LAYOUTS[layout])).eval()
    decoder = StaticDecoder(model, batch=1, max_len=30)
    first, second = torch.randint(0, 97, (1, 6)), torch.randint(0, 97, (1, 4))
    generate(model, first, 8, decoder=decoder)
    assert torch.equal(
        generate(model, second, 8, decoder=decoder), generate(model, second, 8, use_cache=False)
    )


def test_state_bytes_do_not_grow_with_context():
    config = _config([LayerSpec("deltanet", 2), LayerSpec("linear", 2, window=4)])
    model = CausalLM(config)
    short, long = model.new_cache(3, 8, torch.bfloat16), model.new_cache(3, 4096, torch.bfloat16)
    assert short.nbytes() == long.nbytes() == state_bytes(config, torch.bfloat16, batch=3)
    assert kv_cache_bytes(config, 8, "bf16") == kv_cache_bytes(config, 4096, "bf16")


def test_state_bytes_by_hand():
    # 8 heads of 8 dims. deltanet, 2 states: 2·8·8 fp32 + 3 conv inputs of (8 + 2 + 2)·8 values (bf16).
    # linear, feature_dim 8 (16 features), window 4: 8·16·(8 + 1) fp32 + 3 keys and values of 2·8 (bf16).
    config = _config([LayerSpec("deltanet", 2), LayerSpec("linear", 2, window=4)])
    assert layer_state_bytes(config, config.layers[0], 2) == 4 * 2 * 8 * 8 + 2 * 3 * 12 * 8
    assert layer_state_bytes(config, config.layers[1], 2) == 4 * 8 * 16 * 9 + 2 * 2 * 3 * 2 * 8
    rows = describe_layers(config, 100, "bf16")
    assert [row["values_per_token"] for row in rows] == [0] * 4  # the pattern tiles over 4 layers
    assert [row["state_bytes"] for row in rows] == [row["bytes"] for row in rows]


def test_linear_layer_with_a_window_over_the_whole_sequence_is_softmax_attention():
    # No key is older than the window: the linear terms vanish and the window weight cancels.
    gqa = CausalLM(_config([LayerSpec("gqa", 2)])).eval()
    linear = CausalLM(_config([LayerSpec("linear", 2, window=64)])).eval()
    missing, _ = linear.load_state_dict(gqa.state_dict(), strict=False)
    assert all("feature_map" in name or "window_factors" in name for name in missing)
    ids = torch.randint(0, 97, (2, 17))
    with torch.no_grad():
        assert (linear(ids) - gqa(ids)).abs().max().item() <= TOL


@pytest.mark.parametrize("layout", ["qwen3-next", "lolcats"])
def test_packed_documents_equal_each_document_alone(layout):
    model = CausalLM(_config(LAYOUTS[layout])).eval()
    docs = [torch.randint(0, 97, (n,)) for n in (7, 12, 5)]
    document_ids = torch.cat([torch.full((len(d),), i) for i, d in enumerate(docs)])[None]
    with torch.no_grad():
        packed = model(torch.cat(docs)[None], document_ids=document_ids)
        alone = torch.cat([model(doc[None]) for doc in docs], dim=1)
    assert (packed - alone).abs().max().item() <= TOL


@pytest.mark.parametrize(
    ("pattern", "match"),
    [
        (
            [LayerSpec("deltanet"), LayerSpec("gqa", kv_from=0)],
            r"layers\[1\]\.kv_from=0: layer 0 is 'deltanet'",
        ),
        (
            [LayerSpec("linear"), LayerSpec("linear", kv_from=0)],
            r"layers\[1\]\.kv_from=0: a 'linear' layer keeps",
        ),
        ([LayerSpec("deltanet", window=4)], r"layers\[0\]\.window=4: a 'deltanet' layer"),
        ([LayerSpec("linear", sinks=True)], r"layers\[0\]\.sinks=True"),
        ([LayerSpec("linear", chunk=4)], r"layers\[0\]\.chunk=4"),
        ([LayerSpec("gqa", feature_dim=4)], r"layers\[0\]\.feature_dim=4: only linear layers"),
        ([LayerSpec("linear", conv_size=4)], r"layers\[0\]\.conv_size=4: only deltanet layers"),
        ([LayerSpec("deltanet", conv_size=0)], r"layers\[0\]\.conv_size=0: must be a positive integer"),
        ([LayerSpec("deltanet", 3)], r"layers\[0\]\.n_kv_heads=3: must divide n_heads=8"),
    ],
)
def test_invalid_state_layers_name_the_layer_and_field(pattern, match):
    with pytest.raises(ValueError, match=match):
        _config(pattern)


def test_config_round_trips_through_a_dict():
    config = _config(LAYOUTS["lolcats"])
    assert ModelConfig.from_dict(config.to_dict()).layers == config.layers
