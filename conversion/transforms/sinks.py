"""Fit attention-sink logits from calibration data, so that a layer made local (sliding window or
chunk) loses as little as possible of what its source layer attended to.

Why a sink helps: a local layer renormalises its softmax over the keys it still sees, so mass the
source put on far keys is pushed onto near ones. With a sink ``σ`` the local output becomes
``out_local · sigmoid(lse_local - σ)``, i.e. it is scaled down by the mass the sink absorbs: with
``exp(σ) ≈`` the far keys' share the near keys keep their source weights exactly (only the far keys'
values are lost). ``σ`` is one number per head, so per head we minimise over calibration queries

    E(σ) = Σ_q ‖ out_local,q · sigmoid(lse_local,q - σ) - out_source,q ‖²
         = Σ_q w_q² A_q - 2 w_q B_q + const,   w_q = sigmoid(lse_local,q - σ),

with ``A_q = ‖out_local,q‖²`` and ``B_q = ⟨out_local,q, out_source,q⟩`` accumulated once, by a grid
search then a finer one around the best point (E is a smooth function of one variable). The heads
are fitted apart (o_proj mixes them; this ignores the cross terms). Calibration is sequential: each
layer is fitted on the inputs the converted model, earlier sinks included, really gives it.
"""

from __future__ import annotations

import torch

from kvforge.arch import ModelConfig
from kvforge.arch.model import rotary_key
from kvforge.kernels.masks import causal_window_mask, chunk_mask, combine

from .calibration import LayerStream, check_calibration, rope_tables, source_layer
from .common import EMBEDDINGS, StateDict, attn_prefix

COARSE_GRID = torch.arange(-20.0, 40.0, 0.25)
FINE_STEP = 0.005


def local_stats(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    window: int | None,
    chunk: int | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain attention output ``(batch, seq, heads, v_dim)`` and log-sum-exp ``(batch, seq, heads)``
    over the keys a query sees under ``window``/``chunk`` (float32, eager)."""
    seq, n_heads, n_kv_heads = q.shape[1], q.shape[2], k.shape[2]
    group = n_heads // n_kv_heads
    k, v = k.repeat_interleave(group, dim=2).float(), v.repeat_interleave(group, dim=2).float()
    scores = torch.einsum("bqhd,bkhd->bhqk", q.float(), k) * scale
    keep = causal_window_mask(seq, seq, causal=True, window=window, device=q.device)
    if chunk is not None:
        keep = combine(keep, chunk_mask(seq, seq, chunk, device=q.device))
    scores = scores.masked_fill(~keep, float("-inf"))
    lse = scores.logsumexp(-1)
    out = torch.einsum("bhqk,bkhd->bqhd", torch.softmax(scores, -1), v)
    return out, lse.transpose(1, 2)


def best_sinks(lse: torch.Tensor, own: torch.Tensor, cross: torch.Tensor) -> torch.Tensor:
    """argmin over σ of Σ_q w² A - 2 w B per head; ``lse``, ``own`` (A), ``cross`` (B) are ``(N, heads)``."""

    def error(grid_gh: torch.Tensor) -> torch.Tensor:  # (grid, heads) -> (grid, heads)
        w = torch.sigmoid(lse.unsqueeze(0) - grid_gh.unsqueeze(1))  # (grid, N, heads)
        return (w.square() * own - 2 * w * cross).sum(1)

    n_heads = lse.shape[1]
    coarse = COARSE_GRID.unsqueeze(1).expand(-1, n_heads)
    best = coarse.gather(0, error(coarse).argmin(0, keepdim=True))[0]
    step = float(COARSE_GRID[1] - COARSE_GRID[0])
    fine = best + torch.arange(-step, step + FINE_STEP, FINE_STEP).unsqueeze(1)
    return fine.gather(0, error(fine).argmin(0, keepdim=True))[0]


class SinkFitStage:
    """A :class:`~.stages.LayerStage` giving every layer of ``target`` that has sinks, and none in its
    tensors yet, a fitted ``self_attn.sinks``. ``target`` has the same weights as ``source`` with some
    layers made local; each such layer is fitted to reproduce its ``source`` layer's attention, on the
    inputs the converted layers before it (sinks included) give it. One layer in memory at a time."""

    def __init__(
        self,
        source: ModelConfig,
        target: ModelConfig,
        calibration: torch.Tensor,
        what: str,
        device: str | torch.device = "cpu",
    ) -> None:
        self.calibration = check_calibration(calibration, source, what)
        self.source, self.target, self.device = source, target, torch.device(device)
        tables = rope_tables(target, calibration.shape[1])
        self.ropes = {k: tuple(t.to(self.device) for t in v) for k, v in tables.items()}

    def other(self, tensors: StateDict) -> StateDict:
        self.stream = LayerStream(self.target, tensors[EMBEDDINGS].to(self.device), self.calibration)
        return tensors

    @torch.no_grad()
    def layer(self, index: int, tensors: StateDict) -> StateDict:
        spec, before = self.target.layers[index], self.source.layers[index]
        name = f"{attn_prefix(index)}sinks"
        fit = spec.sinks and name not in tensors
        out = {**tensors, name: torch.zeros(self.target.n_heads)} if fit else dict(tensors)
        layer = source_layer(self.target, out, index, self.device)
        rope = self.ropes.get(rotary_key(self.target, spec))
        if fit:
            stats = []
            for x in self.stream.attention_inputs(layer):
                (q, k, v), scale = layer.self_attn.heads(x, rope)
                wanted, _ = local_stats(q, k, v, scale, before.window, before.chunk)
                local, lse = local_stats(q, k, v, scale, spec.window, spec.chunk)
                stats.append((lse, local.square().sum(-1), (local * wanted).sum(-1)))
            lse, own, cross = (torch.cat([s[j].flatten(0, 1) for s in stats]).cpu() for j in range(3))
            sinks = best_sinks(lse, own, cross)
            layer.self_attn.sinks.copy_(sinks)
            out[name] = sinks.clone()
        self.stream.advance(layer, rope)
        return out
