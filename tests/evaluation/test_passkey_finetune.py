"""The passkey fine-tune: its batches score only the answer, and it teaches stories260K to retrieve."""

from __future__ import annotations

import copy

import pytest
import torch

from kvforge.evaluation import PasskeySettings, PasskeyTask, retrieval_accuracy
from kvforge.evaluation.passkey_finetune import (
    FinetuneStage,
    PasskeyFinetuneConfig,
    PasskeyStream,
    finetune_passkey,
)
from kvforge.kernels.cross_entropy import IGNORE_INDEX
from tests.evaluation.helpers import stories260k


def test_training_batches_score_only_the_answer_tokens():
    task = PasskeyTask(stories260k().tokenizer, key_digits=4)
    config = PasskeyFinetuneConfig(stages=(FinetuneStage(5, 128, 1e-3),), batch_size=3)
    inputs, targets = next(iter(PasskeyStream(task, config)))
    assert inputs.shape == targets.shape and inputs.shape[0] == 3
    scored = targets != IGNORE_INDEX
    answer_len = len(task._encode("1234"))
    assert scored.sum(dim=1).tolist() == [answer_len] * 3
    assert scored[:, -answer_len:].all()  # the answer ends every sequence
    # The targets are the next inputs: the model learns to emit the key right after the question.
    assert torch.equal(targets[:, -answer_len:-1], inputs[:, -answer_len + 1 :])


def test_stages_follow_each_other():
    config = PasskeyFinetuneConfig(stages=(FinetuneStage(10, 128, 3e-3), FinetuneStage(5, 256, 1e-3)))
    assert config.steps == 15
    assert [config.stage_at(s).max_context for s in (0, 9, 10, 14, 99)] == [128, 128, 256, 256, 256]


def test_fine_tune_longer_than_the_model_supports_is_a_clear_error():
    loaded = stories260k()
    config = PasskeyFinetuneConfig(stages=(FinetuneStage(1, 1024, 1e-3),))
    with pytest.raises(ValueError, match=r"max_context=1024 exceeds the model's max_seq_len=512"):
        finetune_passkey(loaded.model, PasskeyTask(loaded.tokenizer), config)


@pytest.mark.slow
def test_fine_tune_teaches_stories260k_to_retrieve_the_key():
    loaded = stories260k()
    task = PasskeyTask(loaded.tokenizer, key_digits=5)
    settings = PasskeySettings(contexts=[96], depths=[0.5, 1.0], trials=4, seed=0)
    before = retrieval_accuracy(loaded.model, task, settings)
    model = copy.deepcopy(loaded.model)
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 260K model gains nothing from more, and loses a lot on shared cores
    try:
        finetune_passkey(model, task, PasskeyFinetuneConfig(stages=(FinetuneStage(400, 128, 3e-3),)))
    finally:
        torch.set_num_threads(threads)
    after = retrieval_accuracy(model, task, settings)
    assert before.accuracy == 0.0
    assert after.accuracy >= 0.5  # observed 0.75-0.88 over three runs; 0.0 before
