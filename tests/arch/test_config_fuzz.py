"""Property tests over random configs (hypothesis).

- Valid by construction (every form, windows, sharing, mixes, MLA variants): the model builds, trains,
  caches with exactly the analytic bytes and decodes cached = uncached.
- A valid config with one field replaced by a hostile value (zero, negative, too large, wrong type):
  either it is still valid and works end to end, or construction raises ValueError - never a deeper
  exception later.
"""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvforge.arch import CausalLM, ModelConfig, kv_cache_bytes

HEADS = [1, 2, 4, 8]


@st.composite
def valid_configs(draw) -> dict:
    n_heads = draw(st.sampled_from(HEADS))
    divisors = [d for d in HEADS if n_heads % d == 0]
    head_dim = draw(st.sampled_from([2, 4, 6, 8]))
    n_layers = draw(st.integers(1, 5))
    layers = []
    for index in range(n_layers):
        owners = [j for j in range(index) if layers[j]["kv_from"] is None]
        if owners and draw(st.booleans()):
            owner = draw(st.sampled_from(owners))
            spec = {**layers[owner], "kv_from": owner}
        else:
            attention = draw(st.sampled_from(["gqa", "mla"]))
            spec = {
                "attention": attention,
                "n_kv_heads": draw(st.sampled_from(divisors)) if attention == "gqa" else None,
                "window": draw(st.one_of(st.none(), st.integers(1, 12))),
                "kv_from": None,
            }
        layers.append(spec)
    return {
        "vocab_size": draw(st.integers(2, 40)),
        "d_model": draw(st.sampled_from([8, 16, 24])),
        "n_layers": n_layers,
        "n_heads": n_heads,
        "head_dim": head_dim,
        "max_seq_len": 16,
        "layers": layers,
        "tie_embeddings": draw(st.booleans()),
        "qk_norm": draw(st.booleans()),
        "attention_bias": draw(st.booleans()),
        "kv_lora_rank": draw(st.integers(1, 12)),
        "qk_rope_head_dim": draw(st.sampled_from([2, 4, 6])),
        "qk_nope_head_dim": draw(st.integers(0, 6)),
        "v_head_dim": draw(st.integers(1, 6)),
        "q_lora_rank": draw(st.one_of(st.none(), st.integers(1, 8))),
        "mla_rope_heads": draw(st.sampled_from(divisors)),
        "mla_latent_norm": draw(st.booleans()),
        "mla_absorb": draw(st.sampled_from(["auto", "always", "never"])),
        "rope_scaling": draw(
            st.sampled_from(
                [
                    None,
                    {"type": "linear", "factor": 2.0},
                    {"type": "llama3", "factor": 8.0, "original_max_seq_len": 8},
                    {
                        "type": "yarn",
                        "factor": 4.0,
                        "original_max_seq_len": 8,
                        "mscale": 1.0,
                        "mscale_all_dim": 1.0,
                    },
                ]
            )
        ),
    }


HOSTILE = st.sampled_from([0, -1, -7, 3, 9, 1000, 2.5, "8", None, True, [], {"type": "ntk"}])
TOP_FIELDS = [
    "vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "ffn_dim", "max_seq_len",
    "rope_theta", "norm_eps", "kv_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim",
    "q_lora_rank", "mla_rope_heads", "rope_scaling", "mla_absorb", "layers", "tie_embeddings",
]  # fmt: skip
LAYER_FIELDS = ["attention", "n_kv_heads", "window", "kv_from"]


def _check_end_to_end(config: ModelConfig, seed: int) -> None:
    torch.manual_seed(seed)
    model = CausalLM(config)
    ids = torch.randint(0, config.vocab_size, (2, 11))
    loss = model.loss(ids[:, :-1], ids[:, 1:])
    loss.backward()
    assert torch.isfinite(loss)
    cache = model.new_cache(2, 11, dtype=torch.float32)
    assert cache.nbytes() == kv_cache_bytes(config, 11, torch.float32, batch=2)
    model.eval()
    with torch.no_grad():
        reference = model(ids)
        steps = [model(ids[:, :3], cache=cache)] + [
            model(ids[:, i : i + 1], cache=cache) for i in range(3, 11)
        ]
    assert (torch.cat(steps, 1) - reference).abs().max().item() <= 1e-4


FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(fields=valid_configs(), seed=st.integers(0, 2**16))
def test_valid_random_configs_work_end_to_end(fields, seed):
    _check_end_to_end(ModelConfig(**fields), seed)


@FUZZ
@given(fields=valid_configs(), data=st.data(), seed=st.integers(0, 2**16))
def test_one_hostile_field_is_a_value_error_or_still_works(fields, data, seed):
    if data.draw(st.booleans()):
        fields[data.draw(st.sampled_from(TOP_FIELDS))] = data.draw(HOSTILE)
    else:
        layer = data.draw(st.integers(0, fields["n_layers"] - 1))
        fields["layers"][layer] = {
            **fields["layers"][layer],
            data.draw(st.sampled_from(LAYER_FIELDS)): data.draw(HOSTILE),
        }
    try:
        config = ModelConfig(**fields)
    except ValueError as err:
        assert "=" in str(err) or "required" in str(err)  # names the field and the value
        return
    _check_end_to_end(config, seed)
