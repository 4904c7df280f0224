"""GGUF import: llama.cpp files become HF directories equal to the model they came from, with provenance."""

from __future__ import annotations

import hashlib
import json

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from kvforge.cli.main import main
from kvforge.conversion import load_pretrained
from kvforge.conversion.gguf import PROVENANCE_FILE, import_gguf, model_directory, read_provenance
from tests.conftest import shared_path
from tests.conversion.gguf_files import VOCAB, tiny_llama, write_llama_gguf

Q8_0, F32 = gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.F32


@pytest.fixture(scope="module")
def tiny():
    return tiny_llama()


@pytest.fixture(scope="module")
def tiny_q8(tiny, tmp_path_factory):
    return write_llama_gguf(tmp_path_factory.mktemp("gguf") / "tiny-q8_0.gguf", tiny, Q8_0)


def transformers_gguf_model(path):
    """transformers' own GGUF load (pad id 2**32 - 1 is refused by the embedding, so it is cleared)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    config.pad_token_id = None
    return AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, config=config, dtype=torch.float32
    ).eval()


def test_stories260k_gguf_imports_bit_identical_to_the_shared_hf_directory(tmp_path):
    # The shared directory was converted from this file by reordering Q/K rows (rotary pairs -> halves).
    out = import_gguf(shared_path("sources", "stories260K.gguf"), tmp_path / "stories")
    imported = load_file(out / "model.safetensors")
    reference = load_file(shared_path("stories260K", "model.safetensors"))
    for name, tensor in reference.items():
        assert torch.equal(imported[name], tensor), name
    # The GGUF stores output.weight separately (bit-equal to the embeddings); the import keeps it.
    assert torch.equal(imported["lm_head.weight"], reference["model.embed_tokens.weight"])
    hf = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in hf
    assert (hf["rms_norm_eps"], hf["pad_token_id"], hf["num_key_value_heads"]) == (1e-5, None, 4)


def test_f32_gguf_import_recovers_the_hf_weights_exactly(tiny, tmp_path):
    # Written as llama.cpp's converter does (Q/K permuted into pairs): the import must undo it exactly.
    path = write_llama_gguf(tmp_path / "tiny.gguf", tiny, F32)
    imported = load_file(import_gguf(path, tmp_path / "out") / "model.safetensors")
    for name, tensor in tiny.state_dict().items():
        assert torch.equal(imported[name], tensor), name


def test_quantised_gguf_import_matches_transformers_gguf_logits(tiny_q8, tmp_path):
    from transformers import AutoModelForCausalLM

    out = import_gguf(tiny_q8, tmp_path / "out")
    ids = torch.randint(0, len(VOCAB), (2, 24))
    with torch.no_grad():
        expected = transformers_gguf_model(tiny_q8)(ids).logits
        stock = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()(ids).logits
        kvforge_model = load_pretrained(out)
    assert torch.equal(stock, expected)  # same dequantised values, same config
    torch.testing.assert_close(kvforge_logits(kvforge_model, ids), expected, atol=1e-4, rtol=1e-4)
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"


def kvforge_logits(pretrained, ids):
    from kvforge.arch import CausalLM

    model = CausalLM(pretrained.config).eval()
    model.load_state_dict(pretrained.state_dict)
    with torch.no_grad():
        return model(ids)


def test_import_records_provenance_and_the_embedded_tokenizer(tiny_q8, tmp_path):
    from transformers import AutoTokenizer

    out = import_gguf(tiny_q8, tmp_path / "out")
    provenance = read_provenance(out)
    assert provenance["source_file"] == "tiny-q8_0.gguf"
    assert provenance["sha256"] == hashlib.sha256(tiny_q8.read_bytes()).hexdigest()
    assert provenance["tensor_types"] == {"F32": 5, "Q8_0": 16}  # norms stay F32, every matrix Q8_0
    assert provenance["gguf_architecture"] == "llama"
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer("abc d")["input_ids"] == [1, VOCAB.index("▁a"), VOCAB.index("b"), VOCAB.index("c"), 7]
    assert tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == "hi"
    generation = json.loads((out / "generation_config.json").read_text())
    assert (generation["bos_token_id"], generation["eos_token_id"]) == (1, 2)


def test_dtype_option_stores_bf16(tiny_q8, tmp_path):
    out = import_gguf(tiny_q8, tmp_path / "out", dtype="bf16")
    assert {t.dtype for t in load_file(out / "model.safetensors").values()} == {torch.bfloat16}


def test_unsupported_architecture_is_refused_naming_the_supported_ones(tiny, tmp_path):
    path = write_llama_gguf(tmp_path / "phi.gguf", tiny, F32, architecture="phi3")
    with pytest.raises(ValueError, match=r"architecture 'phi3' is not supported.*'llama'.*'qwen2'.*'gemma3'"):
        import_gguf(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_unsupported_tensor_type_is_refused_naming_the_supported_ones(tiny, tmp_path):
    blocks = np.zeros((4, gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_K][1]), dtype=np.uint8)
    extra = {"blk.0.extra.weight": (blocks, gguf.GGMLQuantizationType.Q8_K)}
    path = write_llama_gguf(tmp_path / "q8k.gguf", tiny, F32, extra_tensors=extra)
    with pytest.raises(
        ValueError, match=r"tensor type\(s\) \['Q8_K'\] cannot be dequantised.*Supported types: .*Q4_1"
    ):
        import_gguf(path, tmp_path / "out")


def test_tensors_the_reader_cannot_map_are_refused_not_dropped(tiny, tmp_path):
    extra = {"rope_freqs.weight": (np.ones(8, dtype=np.float32), F32)}
    path = write_llama_gguf(tmp_path / "llama3.gguf", tiny, F32, extra_tensors=extra)
    with pytest.raises(ValueError, match=r"rope_freqs.weight.*Llama-3 RoPE frequency factors"):
        import_gguf(path, tmp_path / "out")


def test_not_a_gguf_file_is_a_clear_error(tmp_path):
    path = tmp_path / "broken.gguf"
    path.write_bytes(b"not a gguf at all" * 10)
    with pytest.raises(ValueError, match="not a readable GGUF file"):
        import_gguf(path, tmp_path / "out")


def test_kvforge_import_command(tiny_q8, tmp_path, capsys):
    assert main(["import", str(tiny_q8), str(tmp_path / "out")]) == 0
    assert "Q8_0 x16" in capsys.readouterr().out
    assert (tmp_path / "out" / PROVENANCE_FILE).is_file()
    assert main(["import", str(tiny_q8), str(tmp_path / "out")]) == 2  # exists, no --overwrite


def test_gguf_is_imported_once_into_the_cache(tiny_q8, tmp_path, monkeypatch):
    monkeypatch.setenv("KVFORGE_CACHE", str(tmp_path / "cache"))
    first = model_directory(tiny_q8, log=lambda message: None)
    assert first.is_relative_to(tmp_path / "cache") and read_provenance(first) is not None

    def no_second_import(*args, **kwargs):
        raise AssertionError("imported again")

    monkeypatch.setattr("kvforge.conversion.gguf.cache.import_gguf", no_second_import)
    assert model_directory(tiny_q8, log=lambda message: None) == first
    assert model_directory(tmp_path, log=lambda message: None) == tmp_path  # directories pass through


def test_kvforge_convert_and_eval_take_a_gguf_file(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("KVFORGE_CACHE", str(tmp_path / "cache"))
    source = str(shared_path("sources", "stories260K.gguf"))
    out = tmp_path / "swa"
    assert main(["convert", source, str(out), "--to", "window", "--windows", "64,64,64,64,none"]) == 0
    assert [spec.window for spec in load_pretrained(out).config.layers] == [64, 64, 64, 64, None]
    assert (
        read_provenance(out)["sha256"]
        == read_provenance(next((tmp_path / "cache" / "gguf").iterdir()))["sha256"]
    )
    text = str(shared_path("corpora", "tinystories_val_prefix.txt"))
    args = [
        "eval",
        source,
        "--text",
        text,
        "--tasks",
        "perplexity",
        "--max-tokens",
        "256",
        "--context",
        "128",
    ]
    assert main([*args, "--out", str(tmp_path / "eval"), "--no-plots"]) == 0
    report = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert report["models"][0]["perplexity"]
