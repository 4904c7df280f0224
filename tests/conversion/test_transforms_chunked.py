"""to_chunked: Llama 4's pattern (chunked local layers, a global NoPE layer every N) on a checkpoint,
from Python and from `kvforge convert`; the weights do not change and bad options name the field."""

from __future__ import annotations

import pytest

from kvforge.arch import CausalLM, LayerSpec, kv_cache_bytes
from kvforge.cli.main import main
from kvforge.conversion import load_pretrained
from kvforge.conversion.transforms import check_options, to_chunked
from tests.conftest import shared_path, tiny_base, tiny_form


def test_every_nth_layer_is_global_nope_and_the_rest_chunked():
    config = tiny_base(n_layers=8, pattern=[LayerSpec("gqa", 2)])
    state_dict = CausalLM(config).state_dict()
    new_config, new_state = to_chunked(config, state_dict, chunk=8, global_every=4)
    assert [spec.chunk for spec in new_config.layers] == [8, 8, 8, None] * 2
    assert [spec.rope for spec in new_config.layers] == [True, True, True, False] * 2
    assert new_state.keys() == state_dict.keys()
    assert all(new_state[name] is state_dict[name] for name in state_dict)
    # 6 local layers cache 8 positions, 2 global layers every one
    per_position = 2 * 2 * 8 * 2  # K and V, 2 heads of 8 dims, bf16
    assert kv_cache_bytes(new_config, 64) == per_position * (6 * 8 + 2 * 64)


def test_keep_rope_and_no_global_layer():
    config = tiny_base(pattern=[LayerSpec("gqa", 2)])
    state_dict = CausalLM(config).state_dict()
    kept, _ = to_chunked(config, state_dict, chunk=8, global_every=2, nope=False)
    assert [(s.chunk, s.rope) for s in kept.layers] == [(8, True), (None, True)] * 2
    local, _ = to_chunked(config, state_dict, chunk=8, global_every=None)
    assert [s.chunk for s in local.layers] == [8] * 4


@pytest.mark.parametrize(
    ("form", "options", "match"),
    [
        ("gqa", {"chunk": 0}, r"chunk=0: must be a positive integer"),
        ("gqa", {"chunk": 64}, r"chunk=64 must be an integer in 1\.\.63"),
        ("gqa", {"chunk": 8, "global_every": 1}, r"global_every=1 must be in 2\.\.n_layers=4"),
        ("cla", {"chunk": 8}, r"layer 1 reads layer 0's K/V"),
        ("mla", {"chunk": 8}, r"layer 3 would be a global NoPE layer but is 'mla'"),
    ],
)
def test_bad_options_name_the_option(form, options, match):
    with pytest.raises(ValueError, match=match):
        check_options("chunked", tiny_form(form), **options)


def test_mla_layers_chunk_when_the_global_layers_keep_rope():
    config, _ = to_chunked(tiny_form("mla"), CausalLM(tiny_form("mla")).state_dict(), chunk=8, nope=False)
    assert [s.chunk for s in config.layers] == [8, 8, 8, None]


def test_cli_converts_stories260k_to_chunked_nope_kvforge_typed(tmp_path, capsys):
    out = tmp_path / "chunked"
    args = ["convert", str(shared_path("stories260K")), str(out), "--to", "chunked", "--chunk", "64"]
    assert main([*args, "--global-every", "5"]) == 0
    printed = " ".join(capsys.readouterr().out.split())  # the console wraps long notes
    assert "chunked local attention" in printed and "kvforge-typed" in printed
    config = load_pretrained(out).config
    assert [(s.chunk, s.rope) for s in config.layers] == [(64, True)] * 4 + [(None, False)]
