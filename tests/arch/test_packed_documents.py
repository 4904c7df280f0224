"""Packed training: with ``document_ids`` a block of several documents computes exactly what each
document computes alone (positions restart, no attention across a boundary)."""

from __future__ import annotations

import pytest
import torch

from kvforge.arch import CausalLM
from kvforge.kernels.cross_entropy import IGNORE_INDEX
from kvforge.kernels.documents import document_positions
from tests.conftest import tiny_form

FORMS = ["gqa", "mla", "swa", "cla", "mix"]
TOL = 1e-5
DOC_LENGTHS = [[7, 12, 5], [16, 8]]  # two packed rows of 24 tokens; 12 > window 5 of swa/mix


def _packed_batch(vocab: int = 97):
    docs = [[torch.randint(0, vocab, (n,)) for n in row] for row in DOC_LENGTHS]
    input_ids = torch.stack([torch.cat(row) for row in docs])
    document_ids = torch.stack(
        [torch.cat([torch.full((len(d),), i) for i, d in enumerate(row)]) for row in docs]
    )
    return docs, input_ids, document_ids


def test_positions_restart_at_every_document():
    document_ids = torch.tensor([[0, 0, 0, 1, 1, 2], [5, 5, 5, 5, 5, 5]])
    assert document_positions(document_ids).tolist() == [[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5]]


@pytest.mark.parametrize("form", FORMS)
def test_packed_logits_equal_each_document_alone(form):
    model = CausalLM(tiny_form(form)).eval()
    docs, input_ids, document_ids = _packed_batch()
    with torch.no_grad():
        packed = model(input_ids, document_ids=document_ids)
        alone = torch.stack([torch.cat([model(doc[None])[0] for doc in row]) for row in docs])
    assert (packed - alone).abs().max().item() <= TOL


@pytest.mark.parametrize("form", FORMS)
def test_packed_loss_equals_the_sum_of_per_document_losses(form):
    model = CausalLM(tiny_form(form))
    docs, input_ids, document_ids = _packed_batch()
    # Each document predicts its own next tokens; its last token's target (the next document) is ignored.
    targets = torch.stack(
        [torch.cat([torch.cat((doc[1:], torch.tensor([IGNORE_INDEX]))) for doc in row]) for row in docs]
    )
    n_predicted = (targets != IGNORE_INDEX).sum()
    packed_total = model.loss(input_ids, targets, document_ids=document_ids) * n_predicted
    per_document_total = sum(
        model.loss(doc[None, :-1], doc[None, 1:]) * (len(doc) - 1) for row in docs for doc in row
    )
    torch.testing.assert_close(packed_total, per_document_total, rtol=TOL, atol=TOL)
    # ... and so are the gradients.
    (packed_grad,) = torch.autograd.grad(packed_total, model.lm_head.weight)
    (alone_grad,) = torch.autograd.grad(per_document_total, model.lm_head.weight)
    torch.testing.assert_close(packed_grad, alone_grad, rtol=1e-4, atol=1e-5)


def test_without_document_ids_the_documents_do_see_each_other():
    # The masked result differs from plain causal attention over the block: the test above can fail.
    model = CausalLM(tiny_form("gqa")).eval()
    _, input_ids, document_ids = _packed_batch()
    with torch.no_grad():
        assert (model(input_ids) - model(input_ids, document_ids=document_ids)).abs().max() > 1e-2


def test_document_ids_with_a_cache_are_a_clear_error():
    model = CausalLM(tiny_form("gqa")).eval()
    _, input_ids, document_ids = _packed_batch()
    with pytest.raises(ValueError, match="document_ids"):
        model(input_ids, cache=model.new_cache(2, 24), document_ids=document_ids)
