"""Errors shared by the attention backends."""

from __future__ import annotations


class BackendUnavailable(RuntimeError):
    """The requested attention backend cannot run here (missing package, device, dtype or shape)."""
