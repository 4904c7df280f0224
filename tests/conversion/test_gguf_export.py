"""GGUF export: what kvforge writes reads back (through transformers' GGUF reader) as the same weights,
carries llama.cpp's metadata, and forms llama.cpp cannot run are refused by name and layer."""

from __future__ import annotations

import json

import gguf
import pytest
import torch
import transformers
from safetensors.torch import load_file

from kvforge.cli.main import main
from kvforge.conversion import load_pretrained
from kvforge.conversion.gguf import export_gguf, import_gguf
from tests.conftest import shared_path
from tests.conversion.gguf_files import FAMILIES, SIZES, write_tokenizer
from tests.conversion.hf_tiny import VOCAB, randomize_


@pytest.fixture(scope="module", params=list(FAMILIES))
def exported(request, tmp_path_factory):
    config_class, overrides = FAMILIES[request.param]
    root = tmp_path_factory.mktemp(request.param)
    model = transformers.AutoModelForCausalLM.from_config(
        config_class(**{**SIZES, **overrides}), dtype=torch.float32
    )
    randomize_(model).save_pretrained(root / "hf")
    write_tokenizer(root / "hf")
    source = load_pretrained(root / "hf")
    path, _ = export_gguf(source.config, source.state_dict, root / "model.gguf", tokenizer_from=root / "hf")
    return root, path


def test_gguf_export_reads_back_with_equal_weights(exported):
    root, path = exported
    back = load_file(import_gguf(path, root / "back", overwrite=True) / "model.safetensors")
    source = load_file(root / "hf" / "model.safetensors")
    assert set(back) == set(source)
    unit_offset = json.loads((root / "hf" / "config.json").read_text())["model_type"].startswith("gemma")
    for name, tensor in source.items():
        if unit_offset and name.endswith("norm.weight"):  # stored as 1 + w: (w + 1) - 1 rounds in float32
            torch.testing.assert_close(back[name], tensor, atol=2**-23, rtol=0)
        else:
            assert torch.equal(back[name], tensor), name


def test_gguf_export_embeds_the_tokenizer_and_chat_template(exported):
    _, path = exported
    reader = gguf.GGUFReader(path)
    assert reader.get_field("tokenizer.ggml.model").contents() == "gpt2"
    assert (
        reader.get_field("tokenizer.ggml.pre").contents() == "gpt-2"
    )  # llama.cpp's name for the GPT-2 split
    assert (
        len(reader.get_field("tokenizer.ggml.merges").contents()) == 6
    )  # llama.cpp refuses BPE without merges
    assert len(reader.get_field("tokenizer.ggml.tokens").contents()) == VOCAB
    assert "m['content']" in reader.get_field("tokenizer.chat_template").contents()


def test_gemma_windows_are_written_per_layer(exported):
    root, path = exported
    hf = json.loads((root / "hf" / "config.json").read_text())
    if "layer_types" not in hf or not hf["model_type"].startswith("gemma"):
        pytest.skip("no windows in this family")
    reader = gguf.GGUFReader(path)
    arch = reader.get_field("general.architecture").contents()
    assert reader.get_field(f"{arch}.attention.sliding_window").contents() == 5
    pattern = reader.get_field(f"{arch}.attention.sliding_window_pattern").contents()
    assert pattern == [kind == "sliding_attention" for kind in hf["layer_types"]]


def test_stories260k_q8_0_export_is_within_quantisation_error(tmp_path):
    source = shared_path("stories260K")
    assert (
        main(["export", str(source), str(tmp_path / "s.gguf"), "--format", "gguf", "--outtype", "q8_0"]) == 0
    )
    reader = gguf.GGUFReader(tmp_path / "s.gguf")
    assert reader.get_field("tokenizer.ggml.model").contents() == "llama"  # sentencepiece pieces and scores
    kinds = {t.name: t.tensor_type.name for t in reader.tensors}
    assert kinds["blk.0.attn_q.weight"] == "Q8_0" and kinds["blk.0.attn_norm.weight"] == "F32"
    back = load_file(import_gguf(tmp_path / "s.gguf", tmp_path / "back") / "model.safetensors")
    for name, tensor in load_file(source / "model.safetensors").items():
        # Q8_0: 8-bit values times one f16 scale per 32 → error ≤ half a step of the block's max / 127
        torch.testing.assert_close(back[name], tensor, atol=tensor.abs().max().item() / 127, rtol=0)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--to", "cla", "--factor", "2", "--init", "first"],
            r"cross-layer K/V sharing \(kv_from\) on layers \[1, 3\]",
        ),
        (
            ["--to", "window", "--windows", "32,64,64,64,none"],
            r"llama.cpp has no architecture.*different windows \[32, 64\]",
        ),
        (["--to", "chunked", "--chunk", "64"], r"chunked attention on layers"),
    ],
)
def test_forms_llama_cpp_cannot_run_are_refused_by_name_and_layer(tmp_path, capsys, args, message):
    converted = tmp_path / "converted"
    assert main(["convert", str(shared_path("stories260K")), str(converted), *args, "--calib", "none"]) == 0
    assert main(["export", str(converted), str(tmp_path / "x.gguf"), "--format", "gguf"]) == 2
    assert pytest.importorskip("re").search(message, capsys.readouterr().err)
    assert not (tmp_path / "x.gguf").exists()


def test_llama_windows_export_as_granite_swa_with_a_per_layer_pattern(tmp_path):
    # llama.cpp's llama graph ignores windows; granite_swa is Llama's graph with them (and sinks).
    converted = tmp_path / "swa"
    args = ["--to", "window", "--windows", "64,64,64,64,none"]
    assert main(["convert", str(shared_path("stories260K")), str(converted), *args]) == 0
    assert main(["export", str(converted), str(tmp_path / "swa.gguf"), "--format", "gguf"]) == 0
    reader = gguf.GGUFReader(tmp_path / "swa.gguf")
    assert reader.get_field("general.architecture").contents() == "granite_swa"
    assert reader.get_field("granite_swa.attention.sliding_window").contents() == 64
    assert reader.get_field("granite_swa.attention.sliding_window_pattern").contents() == [True] * 4 + [False]
    assert reader.get_field("granite_swa.logit_scale").contents() == 1.0
    sinks = {t.name: t.data for t in reader.tensors if t.name.endswith("attn_sinks.weight")}
    assert len(sinks) == 5 and all((values == -1e30).all() for values in sinks.values())  # no sink: exp = 0


def test_granite_swa_windows_and_sinks_read_back_with_equal_weights(tmp_path):
    import dataclasses

    converted = tmp_path / "swa"
    args = ["--to", "window", "--windows", "64,64,64,64,none"]
    assert main(["convert", str(shared_path("stories260K")), str(converted), *args]) == 0
    source = load_pretrained(converted)
    # sinks on two windowed layers (what `convert --to window --sinks` fits), random logits
    layers = [
        dataclasses.replace(spec, sinks=index in (1, 3)) for index, spec in enumerate(source.config.layers)
    ]
    config = dataclasses.replace(source.config, layers=layers, pattern=None)
    weights = dict(source.state_dict)
    for index in (1, 3):
        weights[f"model.layers.{index}.self_attn.sinks"] = torch.randn(config.n_heads)
    path, said = export_gguf(config, weights, tmp_path / "sinks.gguf", tokenizer_from=converted)
    assert "granite_swa" in said[0]
    back = load_pretrained(import_gguf(path, tmp_path / "back"))
    assert [(spec.window, spec.sinks) for spec in back.config.layers] == [
        (64, False),
        (64, True),
        (64, False),
        (64, True),
        (None, False),
    ]
    assert set(back.state_dict) == set(weights)
    for name, tensor in weights.items():
        assert torch.equal(back.state_dict[name], tensor), name
