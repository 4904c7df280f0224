"""A form defined here, in the test file, and registered: nothing else in kvforge is edited, and it runs
through the decoder, cached decode, the KV-bytes contract, the memory estimates and `kvforge inspect`
(docs/extending.md walks through the same steps)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from torch import nn

from kvforge.arch import CausalLM, LayerSpec, describe_layers, kv_cache_bytes
from kvforge.arch.cache import KVView
from kvforge.arch.form_record import AttentionForm, Rotary
from kvforge.arch.forms import register_form, unregister_form
from kvforge.arch.memory import count_parameters, estimate_inference_memory, estimate_training_memory
from kvforge.arch.rope import apply_rope
from kvforge.conversion import save_pretrained
from kvforge.kernels.attention import attention
from kvforge.training.cli import main
from tests.conftest import tiny_base

TOL = 1e-5


class TiedStateAttention(nn.Module):
    """Multi-query attention whose one cached state per token is both the key and the value."""

    def __init__(self, config, spec) -> None:
        super().__init__()
        self.n_heads, self.head_dim, self.window = config.n_heads, config.head_dim, spec.window
        self.q_proj = nn.Linear(config.d_model, self.n_heads * self.head_dim, bias=False)
        if spec.kv_from is None:
            self.state_proj = nn.Linear(config.d_model, self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, config.d_model, bias=False)

    def cache_features(self) -> list[tuple[int, ...]]:
        return [(1, self.head_dim)]

    def forward(self, x_btd, rope, cache, start, shared, document_ids=None):
        batch, seq, _ = x_btd.shape
        q_bthd = apply_rope(self.q_proj(x_btd).view(batch, seq, self.n_heads, self.head_dim), *rope)
        if shared is not None:
            kv = shared
        else:
            state = apply_rope(self.state_proj(x_btd).view(batch, seq, 1, self.head_dim), *rope)
            if cache is None:
                kv = KVView((state,), causal=True, window=self.window)
            else:
                kv = cache.append((state,), start, self.window)
        (state_all,) = kv.streams
        out = attention(q_bthd, state_all, state_all, **kv.attention_kwargs(), document_ids=document_ids)
        return self.o_proj(out.reshape(batch, seq, -1)), kv


def _weights(config, spec) -> int:
    d, width = config.d_model, config.n_heads * config.head_dim
    return 2 * d * width + (d * config.head_dim if spec.kv_from is None else 0)


TIED = AttentionForm(
    name="tied",
    block=TiedStateAttention,
    kv_values_per_token=lambda config, spec: config.head_dim,
    parameters=_weights,
    projection_weights=_weights,
    mixing_multiply_adds=lambda config, spec, context: config.n_heads * 2 * config.head_dim * context,
    activation_values=lambda config, spec: 3 * config.n_heads * config.head_dim + config.n_heads,
    rotary=lambda config, spec: Rotary("tied", config.head_dim, config.rope_theta, config.rope_scaling),
)


@pytest.fixture
def tied():
    register_form(TIED)
    yield tiny_base(
        n_layers=6, pattern=[LayerSpec("tied"), LayerSpec("tied", kv_from=-1), LayerSpec("tied", window=5)]
    )
    unregister_form("tied")


def test_new_form_decodes_with_cache_as_without(tied):
    model = CausalLM(tied).eval()
    ids = torch.randint(0, 97, (2, 20))
    cache = model.new_cache(2, 20, dtype=torch.float32)
    with torch.no_grad():
        reference = model(ids)
        cached = torch.cat(
            [model(ids[:, :7], cache=cache)] + [model(ids[:, p : p + 1], cache=cache) for p in range(7, 20)],
            1,
        )
    assert (cached - reference).abs().max().item() <= TOL


def test_new_form_cache_bytes_and_parameters_match_its_facts(tied):
    model = CausalLM(tied)
    for seq_len in (3, 5, 17):
        cache = model.new_cache(2, seq_len, dtype=torch.bfloat16)
        assert cache.nbytes() == kv_cache_bytes(tied, seq_len, "bf16", batch=2)
    assert count_parameters(tied) == model.num_parameters()
    assert estimate_inference_memory(tied, 2, 17, "bf16").kv_cache == kv_cache_bytes(tied, 17, "bf16", 2)
    assert estimate_training_memory(tied, 2, 16).parameters == 4 * model.num_parameters()
    assert [row["form"] for row in describe_layers(tied, 16)] == ["tied"] * 6


def test_per_sequence_state_bytes_add_to_the_cache_whatever_its_length(tied):
    stateful = dataclasses.replace(
        TIED, name="tied_state", state_bytes_per_sequence=lambda c, s, item: 3 * item
    )
    register_form(stateful)
    try:
        config, plain = tiny_base(pattern=[LayerSpec("tied_state")]), tiny_base(pattern=[LayerSpec("tied")])
        for seq_len in (1, 9):
            extra = kv_cache_bytes(config, seq_len, "bf16", batch=2) - kv_cache_bytes(
                plain, seq_len, "bf16", batch=2
            )
            assert extra == 2 * config.n_layers * 3 * 2
    finally:
        unregister_form("tied_state")


def test_kvforge_inspect_reports_the_new_form(tied, tmp_path, capsys):
    out = save_pretrained(tied, CausalLM(tied).state_dict(), tmp_path / "tied")
    assert main(["inspect", str(out), "--seq-len", "16", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [row["form"] for row in report["layers"]] == ["tied"] * 6
    assert [row["values_per_token"] for row in report["layers"]] == [8, 0, 8] * 2
    assert report["weights"]["status"] == "match" and report["stock"] is False
    assert report["parameters"] == count_parameters(tied)
    assert report["memory"]["inference"]["kv_cache"] == kv_cache_bytes(tied, 16, "bf16")


def test_a_registered_name_cannot_be_taken_twice(tied):
    with pytest.raises(ValueError, match="'tied' is already registered"):
        register_form(dataclasses.replace(TIED))
    with pytest.raises(ValueError, match="'gqa' is built in"):
        unregister_form("gqa")
