"""Per-head rescaling of merged values, so a converted model trains as well as it computes.

A merge (GQA/MQA's aligned merge, CLA's shared K/V) leaves each new K/V head's value rows at whatever
scale its fit produced, and the least-squares ``o_proj`` compensates: a value head ``c`` times too small
meets ``o_proj`` columns ``c`` times too large. The function does not care - head ``g``'s value is
linear in its rows and read only through the columns of the query heads in group ``g``
(``h // (n_heads / n_kv_heads) = g``), so ``v_g → c·v_g``, ``O_h → O_h / c`` is exact - but Adam's
steps have an absolute size: on SmolLM2-135M the aligned MQA's ``o_proj`` was ~30× the source's and an
uptraining step of 3e-4 wrecked it (docs/results.md, "Uptraining on the real model").

:func:`balance_values` picks ``c_g`` per K/V head so that its value rows and the ``o_proj`` columns reading
them end up equally far from the source layer's scales (``c_g = √(ρ_o / ρ_v)`` with ``ρ`` each tensor's
RMS over the source's): when the product is right, as after MQA's merge, both land on the source's scale;
when the merge also grew the product (one value head now feeds every query head), the excess is split
evenly rather than all left on ``o_proj``. ``c_g`` is rounded to a power of two: multiplying by a power
of two is exact in floating point, so the rescaled model computes bit-for-bit what the fitted one did
(within the exponent range).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .common import rms


def power_of_two(ratio: float) -> float:
    """The power of two nearest ``ratio`` (in log scale); 1 for a ratio that is not positive and finite."""
    if not math.isfinite(ratio) or ratio <= 0:
        return 1.0
    return 2.0 ** round(math.log2(ratio))


def _columns(module: nn.Module, head: int, group: int) -> torch.Tensor:
    """The ``o_proj`` columns of the query heads that read K/V head ``head`` (a view)."""
    columns = module.o_proj.weight.view(-1, module.n_heads, module.head_dim)
    return columns[:, head * group : (head + 1) * group]


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(a, b.to(a.dtype))


@torch.no_grad()
def balance_values(
    modules: list[nn.Module], sources: list[nn.Module], readers: list[int | None]
) -> list[list[float]]:
    """Rescale in place, per K/V head ``g`` of every module that owns ``v_proj``: its value rows (and
    bias) by ``c_g``, and the ``o_proj`` columns of the query heads reading head ``g`` by ``1 / c_g``, in
    the owner and in every module of the group that reads the owner's K/V. ``sources``: the source
    attention module of each layer (its ``v_proj`` and ``o_proj`` give the reference RMS); ``readers[i]``: the
    position in ``modules`` whose K/V module ``i`` reads, ``None`` for its own. Returns each module's
    factors (``[]`` for modules without ``v_proj``). Modules whose source has no ``v_proj`` are left."""
    factors: list[list[float]] = []
    for position, (module, source) in enumerate(zip(modules, sources)):
        value = getattr(module, "v_proj", None) if readers[position] is None else None
        source_value = getattr(source, "v_proj", None)
        if value is None or source_value is None or _same(value.weight, source_value.weight):
            factors.append([])  # nothing to rebalance: no values, or the source's own (copied)
            continue
        readers_of_this = [module] + [m for m, owner in zip(modules, readers) if owner == position]
        reader_sources = [source] + [s for s, owner in zip(sources, readers) if owner == position]
        value_target = rms(source_value.weight)
        output_target = rms(torch.cat([s.o_proj.weight.detach().double().flatten() for s in reader_sources]))
        rows = value.weight.view(module.n_kv_heads, module.head_dim, -1)
        group = module.n_heads // module.n_kv_heads
        scales = []
        for head in range(module.n_kv_heads):
            columns = torch.cat([_columns(reader, head, group).flatten() for reader in readers_of_this])
            value_ratio = rms(rows[head]) / value_target
            output_ratio = rms(columns) / output_target
            scales.append(power_of_two((output_ratio / max(value_ratio, 1e-300)) ** 0.5))
        for head, scale in enumerate(scales):
            if scale == 1.0:
                continue
            rows[head].mul_(scale)
            if value.bias is not None:
                value.bias.view(module.n_kv_heads, module.head_dim)[head].mul_(scale)
            for reader in readers_of_this:
                _columns(reader, head, group).div_(scale)
        factors.append(scales)
    return factors
