"""Merge the K/V that several query heads read into one shared K/V head, in closed form.

Every quantity lives in whitened input coordinates (:mod:`.whitening`): the expected squared error
of a linear function of the input is the squared norm of its coefficients. Each query head ``h``
brings what it reads today:

- its key, per rotary pair a complex row ``κ_{h,i}`` weighted by the query energy ``E|q_{h,i}|²``
  (the expected score error of a key error ``e`` is ``E|q|² · E|e|² / 2`` for independent q, k);
- its value seen through its slice of ``o_proj``: ``O_h V_h`` (values carry no RoPE, so any linear
  map on them folds into ``o_proj``).

The merged key is, per pair, the best rank-1 complex approximation ``κ_{h,i} ≈ α_{h,i} k_i`` (a
complex scalar per head and pair is the only RoPE-safe map; ``conj(α)`` moves into the query),
and the merged value is the top ``head_dim`` right singular subspace of the stacked ``O_h V_h``.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch


@dataclass
class HeadTargets:
    """What each query head reads, in whitened coordinates (see the module docstring).

    key: ``(n_q, pairs, d)`` complex rows; key_weight: ``(n_q, pairs)`` query energies;
    value: ``(n_q, head_dim, d)`` value rows; out_gram: ``(n_q, head_dim, head_dim)`` = ``O_hᵀ O_h``.
    """

    key: torch.Tensor
    key_weight: torch.Tensor
    value: torch.Tensor
    out_gram: torch.Tensor

    def key_energy(self, heads: Sequence[int]) -> float:
        heads = list(heads)
        return float((self.key_weight[heads].unsqueeze(-1) * self.key[heads].abs() ** 2).sum())

    def value_gram(self, heads: Sequence[int]) -> torch.Tensor:
        """``Σ_h (O_h V_h)ᵀ (O_h V_h)``: ``(d, d)``."""
        heads = list(heads)
        return torch.einsum("hkd,hkl,hle->de", self.value[heads], self.out_gram[heads], self.value[heads])

    @functools.cached_property
    def _out_root(self) -> torch.Tensor:
        """``L_h`` with ``L_h L_hᵀ = O_hᵀ O_h`` per head: ``(n_q, head_dim, head_dim)``."""
        eigvals, eigvecs = torch.linalg.eigh(self.out_gram.to(torch.float64))
        return eigvecs * eigvals.clamp_min(0).sqrt().unsqueeze(-2)

    @functools.cached_property
    def _value_cross(self) -> torch.Tensor:
        """Gram of every head's value factor rows: ``(n_q·head_dim, n_q·head_dim)``; a group's value
        spectrum is that of its diagonal block (computed once, read by every candidate group)."""
        factor = self.value_factor(range(len(self.value)))
        return factor @ factor.mT

    @functools.cached_property
    def _key_cross(self) -> torch.Tensor:
        """``⟨κ_h, κ_g⟩`` per pair, scaled by ``√(w_h w_g)``: ``(pairs, n_q, n_q)`` Hermitian."""
        weighted = self.key_weight.clamp_min(1e-30).sqrt().unsqueeze(-1) * self.key  # (n_q, pairs, d)
        return torch.einsum("hpd,gpd->phg", weighted, weighted.conj())

    def merge_errors(self, heads: Sequence[int], value_dim: int) -> tuple[float, float]:
        """The key and value errors of merging ``heads`` (as :func:`merge_keys`/:func:`merge_values`
        compute them), from the heads' Gram blocks: ``len(heads)``-sized eigenproblems only."""
        heads = list(heads)
        keys = self._key_cross[:, heads][:, :, heads]
        key_error = float(torch.linalg.eigvalsh(keys)[:, :-1].clamp_min(0).sum())
        head_dim = self.value.shape[1]
        rows = torch.tensor([h * head_dim + k for h in heads for k in range(head_dim)], device=keys.device)
        block = self._value_cross[rows][:, rows]
        value_error = float(torch.linalg.eigvalsh(block).flip(0)[value_dim:].clamp_min(0).sum())
        return key_error, value_error

    def value_factor(self, heads: Sequence[int]) -> torch.Tensor:
        """``A`` with ``AᵀA = value_gram(heads)``: ``(len(heads)·head_dim, d)``, the rows ``L_hᵀ V_h``.
        Its singular values give the value gram's spectrum from a ``len(heads)·head_dim``-sized problem
        instead of a ``d_model``-sized one (a 512² instead of a 2049² eigenproblem at 2048 wide)."""
        heads = list(heads)
        return (self._out_root[heads].mT @ self.value[heads].to(torch.float64)).reshape(
            -1, self.value.shape[-1]
        )


@dataclass
class MergedHead:
    key: torch.Tensor  # (pairs, d) complex, whitened
    alpha: torch.Tensor  # (len(heads), pairs) complex: κ_h ≈ α_h · key
    value: torch.Tensor  # (value_dim, d) whitened value rows
    key_error: float
    value_error: float


def merge_keys(targets: HeadTargets, heads: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Per pair, the weighted rank-1 complex approximation of the heads' keys.

    The merged key is the heaviest head's key projected on the best direction, so that merging
    copies of one head returns that head's weights exactly (and ``α = 1``)."""
    heads = list(heads)
    weight = targets.key_weight[heads].clamp_min(1e-30)  # (n, pairs)
    members = targets.key[heads].transpose(0, 1)  # (pairs, n, d)
    stacked = weight.mT.sqrt().unsqueeze(-1) * members
    _, S, Vh = torch.linalg.svd(stacked, full_matrices=False)  # one batched SVD for every pair
    error = float((S[:, 1:] ** 2).sum())
    direction = Vh[:, 0]  # (pairs, d): row h of `stacked` ≈ (S₀ U[h, 0]) · Vh[0]
    heaviest = (stacked.abs() ** 2).sum(-1).argmax(-1)  # (pairs,)
    anchor = members[torch.arange(len(members), device=members.device), heaviest]  # (pairs, d)
    key = (anchor * direction.conj()).sum(-1, keepdim=True) * direction
    energy = (key.abs() ** 2).sum(-1).clamp_min(1e-300)  # (pairs,)
    alpha = (members * key.conj().unsqueeze(1)).sum(-1).mT / energy  # (n, pairs)
    return key, alpha, error


def merge_values(targets: HeadTargets, heads: Sequence[int], value_dim: int) -> tuple[torch.Tensor, float]:
    """The top ``value_dim`` principal subspace of ``[O_h V_h]_h``, spanned by the heaviest head's
    value rows projected on it (copies of one head merge into exactly that head)."""
    _, S, Vh = torch.linalg.svd(targets.value_factor(heads), full_matrices=False)
    basis = Vh[:value_dim]  # (value_dim, d) orthonormal rows: the top eigenvectors of value_gram(heads)
    error = float((S[value_dim:] ** 2).sum())
    heads = list(heads)
    energy = torch.einsum(
        "hkd,hkl,hld->h", targets.value[heads], targets.out_gram[heads], targets.value[heads]
    )
    anchor = targets.value[heads[int(energy.argmax())]] @ basis.mT @ basis
    if torch.linalg.matrix_rank(anchor) < value_dim:  # the heaviest head does not span it: use the basis
        anchor = basis * targets.value[heads].pow(2).sum(-1).mean().sqrt()
    return anchor, error


def merge_group(targets: HeadTargets, heads: Sequence[int], value_dim: int) -> MergedHead:
    key, alpha, key_error = merge_keys(targets, heads)
    value, value_error = merge_values(targets, heads, value_dim)
    return MergedHead(key, alpha, value, key_error, value_error)


def output_blocks(targets: HeadTargets, heads: Sequence[int], value: torch.Tensor) -> torch.Tensor:
    """Least-squares ``V_h ≈ M_h · value`` for each head (whitened rows): ``(len(heads), head_dim, value_dim)``.
    ``o_proj``'s block for head ``h`` becomes ``O_h M_h``."""
    solve = torch.linalg.lstsq(value.mT.unsqueeze(0), targets.value[list(heads)].mT).solution
    return solve.mT


def group_cost(
    targets: HeadTargets, heads: Sequence[int], value_dim: int, totals: tuple[float, float]
) -> float:
    """Relative key error + relative value error of merging ``heads`` (0 when they are copies)."""
    key_error, value_error = targets.merge_errors(heads, value_dim)
    return key_error / max(totals[0], 1e-30) + value_error / max(totals[1], 1e-30)


def balanced_partitions(items: Sequence[int], size: int):
    """Every way to split ``items`` into groups of ``size`` (groups unordered)."""
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for mates in itertools.combinations(rest, size - 1):
        remaining = [item for item in rest if item not in mates]
        for tail in balanced_partitions(remaining, size):
            yield [(first, *mates), *tail]


def count_partitions(n: int, size: int) -> int:
    groups = n // size
    return math.factorial(n) // (math.factorial(size) ** groups * math.factorial(groups))


def best_partition(
    n: int, size: int, cost: Callable[[tuple[int, ...]], float], exhaustive_limit: int = 5000
) -> list[tuple[int, ...]]:
    """The grouping of ``range(n)`` into groups of ``size`` with the lowest total cost: exhaustive
    when there are few, else consecutive groups improved by pairwise swaps until no swap helps, a
    group scored by the costs of its pairs (``n(n-1)/2`` evaluations of two-member groups, instead of
    hundreds of full-size candidates each needing a ``size·head_dim``-sized eigenproblem)."""
    cached: dict[tuple[int, ...], float] = {}

    def group_cost_cached(group: tuple[int, ...]) -> float:
        key = tuple(sorted(group))
        if key not in cached:
            cached[key] = cost(key)
        return cached[key]

    if count_partitions(n, size) <= exhaustive_limit:
        return min(
            balanced_partitions(list(range(n)), size),
            key=lambda groups: sum(group_cost_cached(g) for g in groups),
        )
    pair_costs = {pair: group_cost_cached(pair) for pair in itertools.combinations(range(n), 2)}

    def score(group: tuple[int, ...]) -> float:
        return sum(pair_costs[pair] for pair in itertools.combinations(sorted(group), 2))

    groups = [tuple(range(start, start + size)) for start in range(0, n, size)]
    improved = True
    while improved:
        improved = False
        for a, b in itertools.combinations(range(len(groups)), 2):
            for i, j in itertools.product(range(size), range(size)):
                new_a = (*groups[a][:i], groups[b][j], *groups[a][i + 1 :])
                new_b = (*groups[b][:j], groups[a][i], *groups[b][j + 1 :])
                before = score(groups[a]) + score(groups[b])
                if score(new_a) + score(new_b) < before - 1e-12:
                    groups[a], groups[b] = tuple(sorted(new_a)), tuple(sorted(new_b))
                    improved = True
    return groups
