"""The real model (SmolLM2-135M-Instruct, Q4_1 GGUF) imported by `make real-model`: the weights
transformers' own GGUF load has, the logits of stock transformers, and it still knows things."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from benchmarks.real_model_fetch import GGUF_SHA256, real_model_gguf
from kvforge.conversion import load_pretrained
from kvforge.conversion.gguf import read_provenance

pytestmark = pytest.mark.real_model


def test_real_model_answers_like_stock_transformers(real_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kvforge.arch import CausalLM

    provenance = read_provenance(real_model)
    assert provenance["sha256"] == GGUF_SHA256
    assert provenance["tensor_types"] == {"F32": 61, "Q4_1": 210, "Q8_0": 1}
    tokenizer = AutoTokenizer.from_pretrained(real_model)
    ids = tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    pretrained = load_pretrained(real_model)
    model = CausalLM(pretrained.config).eval()
    model.load_state_dict(pretrained.state_dict)
    stock = AutoModelForCausalLM.from_pretrained(real_model, dtype=torch.float32).eval()
    with torch.no_grad():
        logits, expected = model(ids), stock(ids).logits
    torch.testing.assert_close(logits, expected, atol=2e-4, rtol=1e-4)
    # A wrong Q/K row order still loads and runs; it does not know the answer.
    assert tokenizer.decode(logits[0, -1].argmax()) == " Paris"


@pytest.mark.slow  # transformers dequantises the whole file in one thread: ~10-40 s on 2 cores
def test_real_model_weights_equal_transformers_gguf_load(real_model):
    from transformers import AutoModelForCausalLM

    gguf = real_model_gguf()
    reference = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    imported = load_file(real_model / "model.safetensors")
    expected = reference.state_dict()
    assert set(imported) == set(expected) - {"lm_head.weight"}  # tied
    for name, tensor in imported.items():
        assert torch.equal(tensor, expected[name]), name
