"""Multi-key needle prompts (RULER's MK-NIAH): deterministic, exactly as long as asked, every needle in the
haystack, the queried one where asked and the answer its own number; accuracy has one cell per setting."""

from __future__ import annotations

import random

import pytest

from kvforge.evaluation.needles import NeedleSettings, NeedleTask, needle_accuracy
from tests.evaluation.helpers import stories260k


@pytest.fixture(scope="module")
def task():
    return NeedleTask(stories260k().tokenizer, key_digits=4, n_keys=3)


def test_generator_is_deterministic_for_a_seed(task):
    first = task.samples(context=256, depth=0.5, trials=3, seed=7)
    again = task.samples(context=256, depth=0.5, trials=3, seed=7)
    assert [(s.prompt_ids, s.answer_ids) for s in first] == [(s.prompt_ids, s.answer_ids) for s in again]
    assert [s.key for s in first] != [s.key for s in task.samples(256, 0.5, 3, seed=8)]


@pytest.mark.parametrize("context", [200, 301])
def test_prompt_and_answer_fill_exactly_the_context(task, context):
    sample = task.sample(context, 0.5, random.Random(0))
    assert len(sample.prompt_ids) + len(sample.answer_ids) == context


def test_every_needle_is_there_and_the_question_asks_for_one_of_them(task):
    sample = task.sample(256, 0.3, random.Random(5))
    text = task.tokenizer.decode(sample.prompt_ids)
    assert text.count("One of the special magic numbers for") == 3
    word = text.split("What is the special magic number for ")[1].split("?")[0]
    assert f"One of the special magic numbers for {word} is: {sample.key}." in text
    assert task.tokenizer.decode(sample.answer_ids).strip() == sample.key


@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_queried_needle_starts_where_reported(task, depth):
    sample = task.sample(256, depth, random.Random(1))
    word = (
        task.tokenizer.decode(sample.prompt_ids)
        .split("What is the special magic number for ")[1]
        .split("?")[0]
    )
    needle = task._encode(f"One of the special magic numbers for {word} is: {sample.key}.")
    assert sample.prompt_ids[sample.needle_start : sample.needle_start + len(needle)] == needle


def test_context_too_short_for_the_needles_is_a_clear_error(task):
    with pytest.raises(ValueError, match=r"context=40 is too short for 3 needles"):
        task.sample(40, 0.5, random.Random(0))


def test_accuracy_has_one_cell_per_context_and_depth():
    loaded = stories260k()
    task = NeedleTask(loaded.tokenizer, key_digits=3, n_keys=2)
    report = needle_accuracy(loaded.model, task, NeedleSettings(contexts=[192], depths=[0.0, 1.0], trials=2))
    assert [(c.context, c.depth, c.n_trials) for c in report.cells] == [(192, 0.0, 2), (192, 1.0, 2)]
    assert report.accuracy == sum(c.n_correct for c in report.cells) / 4
