"""Hybrids with constant-state layers export as kvforge-typed directories (no stock class holds a Llama-style
layer next to a Gated DeltaNet one: docs/transforms.md) whose generation in transformers equals kvforge's."""

from __future__ import annotations

import pytest

from kvforge.arch import CausalLM, generate
from kvforge.conversion import load_pretrained, plan_export, save_pretrained
from tests.conftest import tiny_form
from tests.conversion.hf_tiny import load_hf, randomize_
from tests.conversion.test_export_targets import token_ids


@pytest.mark.parametrize("form", ["linear", "deltanet"])
def test_generation_from_the_export_equals_kvforges_token_for_token(form, tmp_path):
    config = tiny_form(form)
    model = randomize_(CausalLM(config)).eval()
    out = save_pretrained(config, model.state_dict(), tmp_path / form)
    assert not plan_export(config, None).family.stock
    assert load_pretrained(out).config == config
    hf_model = load_hf(out, trust_remote_code=True)
    prompt = token_ids(6)[:1]
    expected = generate(model, prompt, 24)  # past the window (5): the linear layers' sums are in use
    assert hf_model.generate(prompt, max_new_tokens=24, do_sample=False).tolist() == expected.tolist()
