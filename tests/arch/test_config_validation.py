"""Invalid configs fail once, at construction, with a ValueError naming the layer and field."""

from __future__ import annotations

import pytest

from kvforge.arch import LayerSpec, ModelConfig

BASE = dict(vocab_size=32, d_model=32, n_layers=4, n_heads=4, max_seq_len=16)
MLA = dict(kv_lora_rank=16, qk_rope_head_dim=4)


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"n_kv_heads": 3}, r"n_kv_heads=3 must divide n_heads=4 \(allowed: \[1, 2, 4\]\)"),
        ({"layers": [LayerSpec(n_kv_heads=3)] * 4}, r"layers\[0\]\.n_kv_heads=3"),
        ({"pattern": [LayerSpec(kv_from=1)]}, r"layers\[0\]\.kv_from=1.*layer 0 has no earlier layer"),
        (
            {"pattern": [LayerSpec(), LayerSpec(kv_from=1)]},
            r"layers\[1\]\.kv_from=1.*earlier layer \(0\.\.0\)",
        ),
        ({"pattern": [LayerSpec(), LayerSpec(kv_from=3)]}, r"layers\[1\]\.kv_from=3"),
        ({"pattern": [LayerSpec(), LayerSpec(kv_from=-5)]}, r"layers\[1\]\.kv_from=-4"),
        (
            {"pattern": [LayerSpec("mla"), LayerSpec("gqa", kv_from=-1)], **MLA},
            r"layers\[1\]\.kv_from=0.*same attention form",
        ),
        ({"pattern": [LayerSpec(window=4), LayerSpec(kv_from=-1)]}, r"layers\[1\]\.kv_from=0.*window=4"),
        (
            {"layers": [LayerSpec(), LayerSpec(kv_from=0), LayerSpec(kv_from=1), LayerSpec()]},
            r"layers\[2\]\.kv_from=1.*owns the K/V",
        ),
        ({"pattern": [LayerSpec(window=0)]}, r"layers\[0\]\.window=0"),
        ({"pattern": [LayerSpec(window=-3)]}, r"layers\[0\]\.window=-3"),
        (
            {"pattern": [LayerSpec(attention="mqa")]},
            r"layers\[0\]\.attention='mqa'.*\['gqa', 'mla', 'gta', 'gla', 'linear', 'deltanet'\]",
        ),
        ({"pattern": [LayerSpec("mla")]}, r"kv_lora_rank is required"),
        ({"pattern": [LayerSpec("mla")], "kv_lora_rank": 8}, r"qk_rope_head_dim"),
        (
            {"pattern": [LayerSpec("mla")], "kv_lora_rank": 8, "qk_rope_head_dim": 3},
            r"qk_rope_head_dim=3.*even",
        ),
        ({"pattern": [LayerSpec("mla", n_kv_heads=2)], **MLA}, r"layers\[0\]\.n_kv_heads=2: only gqa"),
        ({"pattern": [LayerSpec("mla")], "mla_rope_heads": 3, **MLA}, r"mla_rope_heads=3"),
        (
            {"pattern": [LayerSpec("mla")], "mla_q_bias": True, "q_lora_rank": 8, **MLA},
            r"mla_q_bias=True.*q_lora_rank=8.*q_lora_rank=None only",
        ),
        ({"pattern": [LayerSpec()] * 3}, r"pattern has 3 entries.*n_layers=4"),
        ({"layers": [LayerSpec()] * 3}, r"layers has 3 entries but n_layers=4"),
        ({"d_model": 30}, r"head_dim.*d_model=30"),
        ({"vocab_size": 0}, r"vocab_size=0"),
        ({"rope_scaling": {"type": "ntk", "factor": 2.0}}, r"rope_scaling\.type='ntk'"),
        ({"rope_scaling": {"type": "llama3", "factor": 8.0}}, r"original_max_seq_len is required"),
        ({"pattern": [{"windw": 3}]}, r"pattern\[0\]: unknown field\(s\) \[.windw.\]"),
    ],
)
def test_invalid_config_raises_value_error_naming_the_field(fields, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig(**{**BASE, **fields})


def test_pattern_is_tiled_and_relative_kv_from_resolved():
    config = ModelConfig(**BASE, pattern=[{}, {"kv_from": -1}])
    assert [spec.kv_from for spec in config.layers] == [None, 0, None, 2]
    assert all(spec.n_kv_heads == 4 for spec in config.layers)


def test_round_trip_through_dict():
    config = ModelConfig(
        **BASE,
        pattern=[LayerSpec("mla"), LayerSpec(window=8)],
        **MLA,
        rope_scaling={"type": "linear", "factor": 2.0},
    )
    again = ModelConfig.from_dict(config.to_dict())
    assert again == config


def test_unknown_top_level_field_is_rejected():
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['n_layer'\]"):
        ModelConfig.from_dict({**BASE, "n_layer": 3})
