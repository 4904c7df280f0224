"""``backend="auto"``: pick the backend for a call from a small measured table (``backend_table.json``).

The table says, per device (CUDA compute capability, e.g. ``sm90``), dtype, *case* and key count,
which backends to try in which order; ``benchmarks/gpu.py --write-table`` regenerates the rows of
the device it runs on. A backend that cannot run a call (not installed, wrong dtype, a kernel torch
refuses for this shape) is skipped with one log line per reason - never a silent slow path.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .backends import BACKENDS
from .log import log_once

TABLE_PATH = Path(__file__).with_name("backend_table.json")
CASES = ("causal", "window", "documents", "mask", "prefix", "decode", "full")
LAST_RESORT = "sdpa"  # runs every call (torch falls back to its math kernel)...
SOFTCAP_LAST_RESORT = "eager"  # ...except soft-capped ones (no SDPA kernel caps scores): the reference does
SOFTCAP_FALLBACK = {"cuda": ("flex", SOFTCAP_LAST_RESORT)}  # per device type; others: eager only


def last_resort(features: frozenset[str]) -> str:
    """The backend that runs every call with these features."""
    return SOFTCAP_LAST_RESORT if "softcap" in features else LAST_RESORT


# (backend, signature) -> error of a backend that failed at run time: auto skips it from then on.
_runtime_failures: dict[tuple, str] = {}


def read_table(path: Path = TABLE_PATH) -> list[dict]:
    return json.loads(Path(path).read_text())["rows"]


# Read once at import, so that resolving a backend inside a torch.compile'd model is pure Python
# over constants (no file access for dynamo to trace).
_TABLE = read_table()


def load_table() -> list[dict]:
    return _TABLE


_device_keys: dict[torch.device, str] = {}


def device_key(device: torch.device) -> str:
    """``sm90`` for a CUDA device of compute capability 9.0; the device type otherwise."""
    if device not in _device_keys:
        if device.type == "cuda":
            major, minor = torch.cuda.get_device_capability(device)
            _device_keys[device] = f"sm{major}{minor}"
        else:
            _device_keys[device] = device.type
    return _device_keys[device]


def dtype_key(dtype: torch.dtype) -> str:
    return "half" if dtype in (torch.float16, torch.bfloat16) else "float32"


def attention_case(
    q_len: int,
    k_len: int,
    *,
    causal: bool,
    window: int | None,
    has_mask: bool,
    has_documents: bool,
) -> str:
    if q_len == 1 and not has_documents:
        return "decode"
    if has_documents:
        return "documents"
    if has_mask:
        return "mask"
    if window is not None:
        return "window"
    if not causal:
        return "full"
    return "causal" if q_len == k_len else "prefix"


def _specificity(row: dict, index: int, device: str, dtype: str, case: str) -> tuple:
    return (row["device"] == device, row["dtype"] == dtype, row["case"] == case, row["min_keys"], -index)


def select_row(rows: list[dict], device: str, generic: str, dtype: str, case: str, k_len: int) -> dict | None:
    """The most specific row for a call: the device's own rows before the generic ones (``cuda``,
    ``cpu``), then an exact dtype, then an exact case, then the largest ``min_keys`` ≤ ``k_len``."""
    return next(
        (row for row in _candidates(rows, device, generic, dtype, case) if row["min_keys"] <= k_len), None
    )


# (id(rows), device, generic, dtype, case) -> (rows, matching rows most specific first). The entry holds
# the rows object itself, so its id cannot be reused by another table while the entry exists.
_candidates_memo: dict[tuple, tuple[list[dict], list[dict]]] = {}


def _candidates(rows: list[dict], device: str, generic: str, dtype: str, case: str) -> list[dict]:
    key = (id(rows), device, generic, dtype, case)
    if key not in _candidates_memo:
        matching = [
            (_specificity(row, index, device, dtype, case), row)
            for index, row in enumerate(rows)
            if row["device"] in (device, generic)
            and row["dtype"] in (dtype, "*")
            and row["case"] in (case, "*")
        ]
        ranked = [row for _, row in sorted(matching, key=lambda pair: pair[0], reverse=True)]
        _candidates_memo[key] = (rows, ranked)
    return _candidates_memo[key][1]


def table_order(device: torch.device, dtype: torch.dtype, case: str, k_len: int) -> tuple[list[str], dict]:
    """The backend order of the table row for this call, and the row itself."""
    key = device_key(device)
    rows = load_table()
    if device.type == "cuda" and not any(row["device"] == key for row in rows):
        log_once(
            f"no-table-{key}",
            f"attention backend 'auto': no measured rows for {torch.cuda.get_device_name(device)} ({key}); "
            "using the generic CUDA rows - run `benchmarks/gpu.py --write-table` on this GPU",
        )
    row = select_row(rows, key, device.type, dtype_key(dtype), case, k_len)
    if row is None:
        return [LAST_RESORT], {"source": "no matching row"}
    return row["order"], row


def signature(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, case: str) -> tuple:
    """What decides whether a kernel can run: device, dtype, case, head dims and grouping."""
    return (str(q.device), q.dtype, case, q.shape[-1], v.shape[-1], q.shape[2] // k.shape[2] > 1)


def resolve_auto(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, case: str, features: frozenset[str] = frozenset()
) -> str:
    """The first backend of the table's order that can run this call. ``features``: which of
    ``mask``, ``documents``, ``kv_lens`` the call has (those a backend lacks natively become a mask)."""
    order, row = table_order(q.device, q.dtype, case, k.shape[1])
    sig = signature(q, k, v, case) if _runtime_failures else None
    skipped = []
    closing = (LAST_RESORT,)
    if "softcap" in features:
        closing = SOFTCAP_FALLBACK.get(q.device.type, (SOFTCAP_LAST_RESORT,))
    for name in (*order, *closing):
        backend = BACKENDS.get(name)
        if backend is None:
            reason = "not a registered backend"
        elif "softcap" in features and "softcap" not in backend.native:
            reason = "it cannot apply attention-logit soft-capping"
        elif sig is not None and (name, sig) in _runtime_failures:
            reason = f"it failed on a call like this one: {_runtime_failures[name, sig]}"
        elif not backend.takes_mask and (
            "mask" in features or features - {"mask", "softcap"} - backend.native
        ):
            reason = f"it cannot apply this call's {'/'.join(sorted(features))} without a dense mask"
        else:
            reason = backend.unavailable(q, k, v)
        if reason is None:
            if skipped:
                log_once(
                    f"skip-{signature(q, k, v, case)}-{name}",
                    f"attention backend 'auto' ({case}, {q.dtype}, {q.device}): using {name!r} instead of "
                    + "; ".join(f"{skip!r} ({why})" for skip, why in skipped)
                    + f". Table row: {row.get('source')}",
                )
            return name
        skipped.append((name, reason))
    return closing[-1]  # unreachable: sdpa (eager for soft-capped calls) always runs


def note_runtime_failure(name: str, q, k, v, case: str, err: Exception) -> None:
    """Remember that ``name`` failed for calls like this one (the next resolution logs the fallback)."""
    _runtime_failures[name, signature(q, k, v, case)] = str(err)
