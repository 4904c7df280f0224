"""Shared pieces of the evaluation tests: the real checkpoint as an eval model, a tiny one, and quick settings."""

from __future__ import annotations

from kvforge.arch import CausalLM
from kvforge.evaluation import EvalModel, EvalSettings, PasskeySettings, load_for_eval
from kvforge.evaluation.needles import NeedleSettings
from kvforge.evaluation.runner import TASKS
from tests.conftest import shared_path, tiny_form

TINYSTORIES = ("corpora", "tinystories_val_prefix.txt")


def stories260k(**options) -> EvalModel:
    return load_for_eval(shared_path("stories260K"), device="cpu", **options)


def tiny_eval_model(form: str = "gqa", tokenizer=None) -> EvalModel:
    return EvalModel(f"tiny-{form}", CausalLM(tiny_form(form)).eval(), tokenizer, shared_path(), "tiny")


def quick_settings(**overrides) -> EvalSettings:
    """Every task at toy sizes: seconds, not minutes."""
    fields = dict(
        tasks=list(TASKS),
        corpora=[str(shared_path(*TINYSTORIES))],
        max_tokens=600,
        contexts=[96, 128],
        passkey=PasskeySettings(depths=[0.0, 1.0], trials=1, key_digits=3),
        needles=NeedleSettings(contexts=[192], depths=[0.5], n_keys=2, trials=1, key_digits=3),
        latency_batches=[1],
        decode_steps=4,
        repeats=1,
        device="cpu",
    )
    fields.update(overrides)
    return EvalSettings(**fields)
