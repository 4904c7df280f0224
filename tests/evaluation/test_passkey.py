"""Passkey prompts: deterministic for a seed, exactly as long as asked, needle where asked; exact-match scoring."""

from __future__ import annotations

import random

import pytest

from kvforge.evaluation import PasskeySettings, PasskeyTask, is_exact_match, retrieval_accuracy
from tests.evaluation.helpers import stories260k, tiny_eval_model


@pytest.fixture(scope="module")
def task():
    return PasskeyTask(stories260k().tokenizer, key_digits=5)


def test_generator_is_deterministic_for_a_seed(task):
    first = task.samples(context=200, depth=0.5, trials=3, seed=7)
    again = task.samples(context=200, depth=0.5, trials=3, seed=7)
    other = task.samples(context=200, depth=0.5, trials=3, seed=8)
    assert [(s.prompt_ids, s.answer_ids) for s in first] == [(s.prompt_ids, s.answer_ids) for s in again]
    assert [s.key for s in first] != [s.key for s in other]


@pytest.mark.parametrize("context", [80, 128, 301])
def test_prompt_and_answer_fill_exactly_the_context(task, context):
    sample = task.sample(context, 0.5, random.Random(0))
    assert len(sample.prompt_ids) + len(sample.answer_ids) == context


def test_prompt_states_the_key_and_asks_for_it(task):
    sample = task.sample(128, 0.5, random.Random(3))
    text = task.tokenizer.decode(sample.prompt_ids)
    assert f"The pass key is {sample.key}. Remember it. {sample.key} is the pass key." in text
    assert text.endswith("What is the pass key? The pass key is")
    assert task.tokenizer.decode(sample.answer_ids).strip() == sample.key


def test_needle_sits_at_the_requested_depth(task):
    question = len(task.question)
    start = task.sample(256, 0.0, random.Random(0))
    end = task.sample(256, 1.0, random.Random(0))
    middle = task.sample(256, 0.5, random.Random(0))
    needle = len(task._encode(f"The pass key is {start.key}. Remember it. {start.key} is the pass key."))
    assert start.needle_start == 0
    assert end.needle_start + needle == len(end.prompt_ids) - question
    haystack = len(middle.prompt_ids) - question - needle
    assert abs(middle.needle_start - haystack / 2) <= max(len(s) for s in task.sentences)


def test_scoring_counts_exact_matches_only():
    assert is_exact_match([5, 1, 2], [5, 1, 2])
    assert not is_exact_match([5, 1, 3], [5, 1, 2])  # one digit wrong
    assert not is_exact_match([5, 1], [5, 1, 2])  # answer cut short
    assert not is_exact_match([1, 2, 5], [5, 1, 2])  # right digits, wrong order


def test_context_too_short_for_the_needle_is_a_clear_error(task):
    with pytest.raises(ValueError, match=r"context=20 is too short for a passkey prompt"):
        task.sample(20, 0.5, random.Random(0))


def test_retrieval_accuracy_has_one_cell_per_context_and_depth():
    loaded = stories260k()
    task = PasskeyTask(loaded.tokenizer, key_digits=3)
    settings = PasskeySettings(contexts=[80, 96], depths=[0.0, 0.5, 1.0], trials=2)
    report = retrieval_accuracy(loaded.model, task, settings)
    assert [(c.context, c.depth, c.n_trials) for c in report.cells] == [
        (ctx, depth, 2) for ctx in (80, 96) for depth in (0.0, 0.5, 1.0)
    ]
    assert report.accuracy == sum(c.n_correct for c in report.cells) / 12


def test_passkey_without_a_tokenizer_is_a_clear_error():
    from kvforge.evaluation import evaluate_model
    from tests.evaluation.helpers import quick_settings

    with pytest.raises(ValueError, match=r"has no tokenizer files"):
        evaluate_model(tiny_eval_model(), quick_settings(tasks=["passkey"]))
