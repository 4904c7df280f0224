"""Attention kernels behind one call. No model code lives here (``kernels`` never imports ``arch``)."""

from .attention import (
    BACKENDS,
    BackendUnavailable,
    attention,
    available_backends,
    register_backend,
    resolve_backend,
)
from .cross_entropy import IGNORE_INDEX, linear_cross_entropy
from .documents import document_mask, document_positions
from .masks import causal_window_mask, length_mask

__all__ = [
    "BACKENDS",
    "IGNORE_INDEX",
    "BackendUnavailable",
    "attention",
    "available_backends",
    "causal_window_mask",
    "document_mask",
    "document_positions",
    "length_mask",
    "linear_cross_entropy",
    "register_backend",
    "resolve_backend",
]
