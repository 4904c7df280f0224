"""Hybrids with constant-state layers export as kvforge-typed directories (no stock class holds a Llama-style
layer next to a Gated DeltaNet one: docs/transforms.md) whose generation in transformers equals kvforge's."""

from __future__ import annotations

import json

import pytest

from kvforge.arch import CausalLM, generate
from kvforge.cli.main import main
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


def test_inspect_shows_the_state_bytes_of_a_hybrid(tmp_path, capsys):
    config = tiny_form("deltanet")
    out = save_pretrained(config, CausalLM(config).state_dict(), tmp_path / "gdn")
    assert main(["inspect", str(out), "--json"]) == 0
    layers = json.loads(capsys.readouterr().out)["layers"]
    assert [row["values_per_token"] for row in layers] == [0, 0, 0, 28]
    assert all(row["state_bytes"] > 0 for row in layers[:3]) and layers[3]["state_bytes"] == 0
