"""Every checkpoint transform on imported Gemma 2 / Gemma 3 models: it works (the result runs, and
exports to the stock Gemma class when that class expresses it, else kvforge-typed with the reason in
the notes) or it refuses with a message naming what blocks it."""

from __future__ import annotations

import pytest
import torch

from kvforge.arch import CausalLM
from kvforge.conversion import load_pretrained, plan_export, save_pretrained
from kvforge.conversion.transforms import TRANSFORMS
from tests.conversion.hf_tiny import VOCAB, load_hf, save_hf_model
from tests.conversion.test_import_parity import LOGITS_ATOL, token_ids

WORKS, REFUSED = "works", "refused"
# (variant, transform, options, outcome, export family or the refusal's words). The tiny models have
# 3 layers (sliding, global, sliding), 8 query heads and 2 K/V heads.
TABLE = [
    ("gemma2", "gqa", {"n_kv_heads": 1}, WORKS, "gemma2"),
    ("gemma2", "mqa", {}, WORKS, "gemma2"),
    ("gemma2", "window", {"windows": 4}, WORKS, "gemma2"),
    (
        "gemma2",
        "window",
        {"windows": [3, None, 3], "sinks": True},
        REFUSED,
        r"sinks=True .* attn_logit_softcap",
    ),
    ("gemma2", "chunked", {"chunk": 4, "global_every": 3, "nope": False}, WORKS, "kvforge"),
    ("gemma2", "gta", {}, WORKS, "kvforge"),
    ("gemma2", "linear", {"transfer_steps": 0}, REFUSED, r"attn_logit_softcap=\S+: layer \d is 'linear'"),
    ("gemma2", "deltanet", {"transfer_steps": 0}, REFUSED, r"is 'deltanet', whose attention does not"),
    ("gemma2", "cla", {"factor": 3, "init": "mean"}, REFUSED, r"have different window"),
    ("gemma2", "mla", {"kv_lora_rank": 16, "rope_dims": 4}, REFUSED, r"layer 0 is 'mla', whose attention"),
    ("gemma2", "gla", {"n_latent_heads": 2, "kv_lora_rank": 16, "rope_dims": 4}, REFUSED, r"'mla', whose"),
    ("gemma3_text", "gqa", {"n_kv_heads": 1, "method": "mean"}, WORKS, "gemma3_text"),
    ("gemma3_text", "gqa", {"n_kv_heads": 1}, WORKS, "gemma3_text"),  # q/k norm: sign-aligned heads
    ("gemma3_text", "mqa", {"method": "mean"}, WORKS, "gemma3_text"),
    ("gemma3_text", "window", {"windows": [3, None, 3]}, WORKS, "gemma3_text"),
    ("gemma3_text", "window", {"windows": [3, None, 3], "sinks": True}, WORKS, "kvforge"),
    ("gemma3_text", "window", {"windows": 4}, REFUSED, r"layer 1 would change from global to sliding"),
    (
        "gemma3_text",
        "chunked",
        {"chunk": 4, "global_every": 3},
        REFUSED,
        r"layer 0 would change from sliding",
    ),
    ("gemma3_text", "cla", {"factor": 3, "init": "mean"}, REFUSED, r"have different window"),
    ("gemma3_text", "gta", {}, REFUSED, r"qk_norm=True is not supported"),
    (
        "gemma3_text",
        "linear",
        {"layers": [0, 2], "transfer_steps": 2},
        WORKS,
        "kvforge",
    ),  # sliding stay sliding
    (
        "gemma3_text",
        "linear",
        {"layers": [1], "transfer_steps": 0},
        REFUSED,
        r"layer 1 would change from global",
    ),
    ("gemma3_text", "deltanet", {"transfer_steps": 0}, REFUSED, r"is 'deltanet', whose attention does not"),
    ("gemma3_text", "mla", {"kv_lora_rank": 16, "rope_dims": 4}, REFUSED, r"sources with window_rope_theta"),
    (
        "gemma3_text",
        "gla",
        {"n_latent_heads": 2, "kv_lora_rank": 16, "rope_dims": 4},
        REFUSED,
        r"sources with window_rope_theta",
    ),
]


def test_the_table_covers_every_transform_on_both_gemmas():
    for variant in ("gemma2", "gemma3_text"):
        assert {row[1] for row in TABLE if row[0] == variant} == set(TRANSFORMS)


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    done = {}

    def build(variant):
        if variant not in done:
            done[variant] = load_pretrained(save_hf_model(variant, tmp_path_factory.mktemp(variant) / "hf"))
        return done[variant]

    return build


def _calibration() -> torch.Tensor:
    return torch.randint(3, VOCAB, (4, 16), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize(
    ("variant", "transform", "options", "outcome", "expected"),
    TABLE,
    ids=[f"{row[0]}-{row[1]}-{i}" for i, row in enumerate(TABLE)],
)
def test_transform_on_gemma_works_or_refuses_clearly(
    imported, tmp_path, variant, transform, options, outcome, expected
):
    source = imported(variant)
    run = TRANSFORMS[transform]
    if outcome == REFUSED:
        with pytest.raises(ValueError, match=expected):
            run(source.config, source.state_dict, _calibration(), **options)
        return
    config, state_dict = run(source.config, source.state_dict, _calibration(), **options)
    model = CausalLM(config).eval()
    model.load_state_dict(state_dict)  # strict: exactly the parameters the new config implies
    plan = plan_export(config)
    assert plan.family.model_type == expected
    if expected == "kvforge":  # the notes say why no stock class holds it
        assert plan.notes[0].startswith("no stock class holds this model")
        return
    out = save_pretrained(config, state_dict, tmp_path / "out")
    ids = token_ids(2, 24)
    with torch.no_grad():
        assert (load_hf(out)(ids).logits - model(ids)).abs().max().item() <= LOGITS_ATOL


def test_gemma2_gta_exports_kvforge_typed_with_the_soft_caps_kept(imported, tmp_path):
    source = imported("gemma2")
    config, state_dict = TRANSFORMS["gta"](source.config, source.state_dict, _calibration())
    model = CausalLM(config).eval()
    model.load_state_dict(state_dict)
    out = save_pretrained(config, state_dict, tmp_path / "gta")
    ids = token_ids(2, 24)
    with torch.no_grad():
        hf_logits = load_hf(out, trust_remote_code=True)(ids).logits
        assert (hf_logits - model(ids)).abs().max().item() <= LOGITS_ATOL
    assert hf_logits.abs().max().item() <= config.final_logit_softcap
