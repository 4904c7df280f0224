"""Fit a converted attention block to the source block's outputs on calibration inputs.

Two tools, both local to one layer (or one group of layers sharing K/V) and both on calibration
text only:

- :func:`refit_output_projection`: the new attention's per-head outputs are fixed once its queries,
  keys and values are; ``o_proj`` is then a linear least-squares fit of the source block's output.
  This is exact whenever the source output is reachable, and lets the values absorb part of what
  the merged keys lost (the fit sees the *new* attention pattern).
- :func:`refine_attention`: a few hundred Adam steps on the same reconstruction error, through
  every new projection (and through MLA's latent RMSNorm). Optional; the closed form is the
  starting point either way.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..host import one_cpu_thread
from .calibration import Rope


@dataclass
class FitUnit:
    """One attention module, its calibration inputs and the outputs it should reproduce (chunks).
    ``reads`` names an earlier unit whose K/V this one attends over (cross-layer sharing)."""

    module: nn.Module
    inputs: list[torch.Tensor]
    targets: list[torch.Tensor]
    rope: Rope
    reads: int | None = None
    weight: float = 1.0
    _scale: float = field(default=0.0, init=False)

    def target_energy(self) -> float:
        if not self._scale:
            total = sum(float(t.double().pow(2).sum()) for t in self.targets)
            self._scale = max(total / sum(t.numel() for t in self.targets), 1e-30)
        return self._scale


def run_units(
    units: list[FitUnit], chunk: int, rows: slice | torch.Tensor = slice(None)
) -> list[torch.Tensor]:
    """Outputs of every unit on one chunk of inputs, passing shared K/V along."""
    views, outputs = [], []
    for unit in units:
        rope = unit.rope
        shared = None
        if unit.reads is not None:
            shared = views[unit.reads]
        out, view = unit.module(unit.inputs[chunk][rows], rope, None, 0, shared)
        views.append(view)
        outputs.append(out)
    return outputs


@torch.no_grad()
def relative_error(units: list[FitUnit]) -> float:
    """Weighted mean over units of ``E‖out - target‖² / E‖target‖²``."""
    total = 0.0
    for chunk in range(len(units[0].inputs)):
        for unit, out in zip(units, run_units(units, chunk)):
            err = float((out.double() - unit.targets[chunk].double()).pow(2).mean())
            total += unit.weight * err / unit.target_energy() * out.shape[0]
    rows = sum(x.shape[0] for x in units[0].inputs)
    return total / rows / sum(unit.weight for unit in units)


@torch.no_grad()
def refit_output_projection(units: list[FitUnit], ridge: float = 1e-3) -> None:
    """Least-squares ``o_proj`` of every unit for the attention pattern its module computes now."""
    for index, unit in enumerate(units):
        o_proj: nn.Linear = unit.module.o_proj
        captured: list[torch.Tensor] = []
        hook = o_proj.register_forward_pre_hook(_appender(captured))
        n_in = o_proj.in_features + (o_proj.bias is not None)
        lhs = torch.zeros(n_in, n_in, dtype=torch.float64, device=o_proj.weight.device)
        rhs = torch.zeros(n_in, o_proj.out_features, dtype=torch.float64, device=o_proj.weight.device)
        try:
            for chunk in range(len(unit.inputs)):
                captured.clear()
                run_units(units[: index + 1], chunk)
                features = captured[-1].reshape(-1, o_proj.in_features).double()
                if o_proj.bias is not None:
                    features = torch.cat((features, torch.ones_like(features[:, :1])), dim=1)
                target = unit.targets[chunk].reshape(-1, o_proj.out_features).double()
                lhs += features.mT @ features
                rhs += features.mT @ target
        finally:
            hook.remove()
        # Ridge towards the closed-form o_proj (not towards zero): where the calibration data does not
        # pin a direction down (heads reading one K/V attend alike), keep the merge's answer instead
        # of large cancelling weights.
        strength = ridge * lhs.diagonal().mean().clamp_min(1e-30)
        lhs += strength * torch.eye(n_in, dtype=lhs.dtype, device=lhs.device)
        prior = o_proj.weight.detach().to(torch.float64)
        if o_proj.bias is not None:
            prior = torch.cat((prior, o_proj.bias.detach().to(torch.float64).unsqueeze(-1)), dim=1)
        rhs += strength * prior.mT
        with one_cpu_thread(lhs.device.type == "cpu"):
            solution = torch.linalg.solve(lhs, rhs).mT.to(o_proj.weight.dtype)
        o_proj.weight.copy_(solution[:, : o_proj.in_features])
        if o_proj.bias is not None:
            o_proj.bias.copy_(solution[:, -1])


def _appender(store: list[torch.Tensor]):
    def hook(_module, args):
        store.append(args[0])

    return hook


def refine_attention(
    units: list[FitUnit],
    steps: int,
    lr: float = 1e-2,
    rows_per_step: int = 4,
    seed: int = 0,
    progress=None,
    parameters: list[nn.Parameter] | None = None,
    relative_lr: bool = True,
) -> float:
    """Adam on the summed relative reconstruction error of ``units`` (cosine-decayed) through
    ``parameters`` (default: every parameter of the units' modules); returns the final relative error.

    ``lr`` is relative: each tensor steps by about ``lr × its RMS`` (Adam's steps are scale-free, so one
    absolute rate would move small tensors, e.g. a latent scaled into its norm's linear regime, by many
    times their size). ``relative_lr=False``: one absolute rate for every tensor (attention transfer,
    whose new parameters may start at zero, where a relative step is none). The closed form is kept
    when refining does not lower the error on the calibration data."""
    if parameters is None:
        parameters = [p for unit in units for p in unit.module.parameters()]
    params = list({id(p): p for p in parameters}.values())
    before = relative_error(units)
    start = [p.detach().clone() for p in params]
    for p in params:
        p.requires_grad_(True)
    groups = [
        {
            "params": [p],
            "lr": lr * (float(p.detach().pow(2).mean().sqrt().clamp_min(1e-12)) if relative_lr else 1.0),
        }
        for p in params
    ]
    optimizer = torch.optim.Adam(groups)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    generator = torch.Generator().manual_seed(seed)
    n_chunks = len(units[0].inputs)
    # a step is a few small matmuls: a second thread mostly spins (docs/results.md, "One CPU thread for
    # small fits and for sampling")
    with one_cpu_thread(params[0].device.type == "cpu"):
        for _ in range(steps):
            chunk = int(torch.randint(n_chunks, (), generator=generator))
            n_rows = units[0].inputs[chunk].shape[0]
            rows = torch.randperm(n_rows, generator=generator)[: min(rows_per_step, n_rows)]
            outputs = run_units(units, chunk, rows)
            loss = sum(
                unit.weight * (out - unit.targets[chunk][rows]).pow(2).mean() / unit.target_energy()
                for unit, out in zip(units, outputs)
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            if progress is not None:
                progress()
    for p in params:
        p.requires_grad_(False)
    after = relative_error(units)
    if not after < before:
        with torch.no_grad():
            for p, p0 in zip(params, start):
                p.copy_(p0)
        return before
    return after
