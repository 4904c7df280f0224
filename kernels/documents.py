"""Packed sequences: several documents laid end to end in one row, told apart by ``document_ids``.

``document_ids`` is ``(batch, seq)`` of integers, non-decreasing along each row, one contiguous run
per document (``[0, 0, 0, 1, 1, 2, ...]``, as a packing DataModule emits them). Attention must not
cross a boundary, and positions restart at each document, so a packed block computes exactly what
its documents would compute one by one - without padding.
"""

from __future__ import annotations

import torch


def document_starts(document_ids: torch.Tensor) -> torch.Tensor:
    """``(batch, seq)`` bool: True where a document begins (always at column 0)."""
    starts = torch.ones_like(document_ids, dtype=torch.bool)
    starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    return starts


def document_positions(document_ids: torch.Tensor) -> torch.Tensor:
    """``(batch, seq)`` position of each token inside its own document (0 at each start)."""
    seq = document_ids.shape[1]
    index = torch.arange(seq, device=document_ids.device).expand_as(document_ids)
    start_index = torch.where(document_starts(document_ids), index, torch.zeros_like(index))
    return index - start_index.cummax(dim=1).values


def document_mask(document_ids: torch.Tensor) -> torch.Tensor:
    """``(batch, 1, seq, seq)`` keep-mask: query and key belong to the same document."""
    return (document_ids.unsqueeze(2) == document_ids.unsqueeze(1)).unsqueeze(1)


def document_cu_seqlens(document_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Cumulative lengths of every document of the flattened batch (flash-attn's varlen layout)
    and the longest one. A row boundary always ends a document. Synchronises with the host."""
    batch, seq = document_ids.shape
    flat_starts = torch.nonzero(document_starts(document_ids).flatten()).flatten()
    total = torch.tensor([batch * seq], device=document_ids.device)
    cu_seqlens = torch.cat((flat_starts, total)).to(torch.int32)
    max_len = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
    return cu_seqlens, max_len


def check_document_ids(document_ids: torch.Tensor, q_len: int, k_len: int, batch: int) -> None:
    if document_ids.dim() != 2 or document_ids.shape != (batch, q_len):
        raise ValueError(
            f"document_ids must be (batch, seq) = ({batch}, {q_len}); got {tuple(document_ids.shape)}"
        )
    if q_len != k_len:
        raise ValueError(
            f"document_ids need as many keys as queries (packed self-attention without a cache); "
            f"got q_len={q_len}, k_len={k_len}"
        )
    if document_ids.dtype.is_floating_point or document_ids.dtype == torch.bool:
        raise ValueError(f"document_ids must be an integer tensor, got {document_ids.dtype}")
