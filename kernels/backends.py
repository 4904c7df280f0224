"""The attention backends and what each can do natively.

Every backend is ``fn(q, k, v, *, causal, window, scale, mask, **native)`` on ``(batch, seq, heads,
dim)`` tensors. A feature a backend does not handle natively - packed ``document_ids``, a static
cache's ``kv_lens``, a ``chunk`` - is lowered by :func:`kvforge.kernels.attention` to an equivalent
boolean mask first, and attention ``sinks`` to one extra key (:mod:`.sinks`); a backend that takes
no mask at all (``flash``, ``triton``) then cannot run that call.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .eager import eager_attention
from .flash import flash_attention, flash_available, flash_unavailable
from .flex import flex_attention_fn, flex_unavailable
from .sdpa import SDPA_KERNELS, forced_sdpa, sdpa_attention, sdpa_kernel_unavailable

AttentionFn = Callable[..., torch.Tensor]
Unavailable = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], "str | None"]


def _runs_anywhere(q, k, v) -> None:
    return None


def _always_installed() -> bool:
    return True


@dataclass(frozen=True)
class Backend:
    name: str
    fn: AttentionFn
    native: frozenset[str] = frozenset()  # subset of {"documents", "kv_lens", "sinks", "softcap"}
    takes_mask: bool = True
    unavailable: Unavailable = _runs_anywhere  # why it cannot run these inputs, or None
    installed: Callable[[], bool] = _always_installed  # can it run on this machine at all


TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def _triton_installed() -> bool:
    return TRITON_INSTALLED and (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1")


def _triton_unavailable(q, k, v) -> str | None:
    if not TRITON_INSTALLED:
        return "backend='triton' needs the triton package (`pip install kvforge[triton]`)"
    if q.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return f"backend='triton' runs on CUDA (or on CPU with TRITON_INTERPRET=1), got {q.device.type!r}"
    if q.shape[1] != 1:
        return f"backend='triton' is a decode kernel: one query token per sequence, got q_len={q.shape[1]}"
    return None


def _triton_decode(q, k, v, *, causal, window, scale, mask, kv_lens=None):
    from .triton_decode import decode_attention  # imports triton: only when this backend runs

    # One query aligned to the last filled key: `causal` hides nothing from it.
    return decode_attention(q, k, v, scale=scale, window=window, kv_lens=kv_lens)


def _sdpa_backend(kernel: str) -> Backend:
    def unavailable(q, k, v):
        return sdpa_kernel_unavailable(kernel, q)

    def installed() -> bool:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        return sdpa_kernel_unavailable(kernel, torch.empty(0, device=device, dtype=torch.bfloat16)) is None

    return Backend(f"sdpa-{kernel}", forced_sdpa(kernel), unavailable=unavailable, installed=installed)


BACKENDS: dict[str, Backend] = {
    "eager": Backend("eager", eager_attention, native=frozenset({"sinks", "softcap"})),
    "sdpa": Backend("sdpa", sdpa_attention),
    **{f"sdpa-{kernel}": _sdpa_backend(kernel) for kernel in SDPA_KERNELS},
    "flex": Backend(
        "flex",
        flex_attention_fn,
        native=frozenset({"documents", "kv_lens", "sinks", "softcap"}),
        unavailable=flex_unavailable,
    ),
    "flash": Backend(
        "flash",
        flash_attention,
        native=frozenset({"documents", "kv_lens"}),
        takes_mask=False,
        unavailable=flash_unavailable,
        installed=flash_available,
    ),
    "triton": Backend(
        "triton",
        _triton_decode,
        native=frozenset({"kv_lens"}),
        takes_mask=False,
        unavailable=_triton_unavailable,
        installed=_triton_installed,
    ),
}


def register_backend(
    name: str,
    fn: AttentionFn,
    *,
    native: tuple[str, ...] = (),
    takes_mask: bool = True,
    unavailable: Unavailable | None = None,
) -> None:
    """Add a backend ``fn(q, k, v, *, causal, window, scale, mask, **native)``."""
    BACKENDS[name] = Backend(name, fn, frozenset(native), takes_mask, unavailable or _runs_anywhere)


def softcap_backends() -> list[str]:
    """Backends that apply attention-logit soft-capping (the others refuse a soft-capped call)."""
    return [name for name, backend in BACKENDS.items() if "softcap" in backend.native]


def available_backends() -> list[str]:
    """Backend names that can run on this machine (``auto`` first)."""
    return ["auto", *(name for name, backend in BACKENDS.items() if backend.installed())]
