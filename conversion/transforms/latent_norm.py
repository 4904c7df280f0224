"""Calibrating DeepseekV3's latent RMSNorm (``kv_a_layernorm``), which the source never had.

The norm scales every token's latent ``c`` by ``ρ / rms(c)``; keys and values are linear in the
latent, so the error is a per-token factor ``ρ/rms(c(t)) - 1`` on that token's keys and values.
Any invertible ``M`` on the latent is free (``kv_a`` → ``M·kv_a``, ``kv_b`` → ``kv_b·M⁻¹``), so we
choose the basis in which ``rms`` varies least over calibration latents: fit a symmetric ``P``
with ``cᵀ P c ≈ 1`` by least squares (linear in ``P``), keep its positive part and take
``M = P^½``; then ``ρ`` is the least-squares constant with ``ρ·c/rms(c) ≈ c``, and ``kv_b`` reads
the normalised latent ``n`` through the least-squares map ``E[c nᵀ] E[n nᵀ]⁻¹`` (best linear
undoing of the per-token scale). What remains is the spread of ``rms(Mc)``, reported as its
coefficient of variation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .common import rms

# Directions of P below this fraction of its largest eigenvalue are clipped to it: keeps M well
# conditioned (kv_b absorbs M⁻¹) at a small cost in flatness.
EIGEN_FLOOR = 1e-2
# The flattening fit reads at most this many calibration tokens, evenly spaced: with more unknowns than
# tokens it solves through the tokens x tokens kernel, so this bounds its memory (128 MiB) and time
# whatever the calibration size.
MAX_TOKENS = 4096
# "linear" regime: the largest calibration latent's mean square is this fraction of the norm's eps, so
# ``rms(c)`` is eps-dominated for every token and the norm is a constant scale to within MARGIN / 2.
LINEAR_MARGIN = 1e-3
# kv_a_layernorm's eps in kvforge's own model in the "linear" regime: DeepSeek's 1e-6 times a power of four
# (the stock export's rescaling, √(1e-6 / eps) = 2^-17, is then exact). With the latent at its natural scale
# (:func:`key_scale`) the norm stays eps-dominated with room for mean squares ~6x above calibration's
# largest on SmolLM2-135M (docs/transforms.md, "At a trainable scale").
LINEAR_EPS = 1e-6 * 4.0**17
# Ridges of the token kernel's Cholesky solve, in units of its round-off level, tried in order.
KERNEL_RIDGES = (1.0, 100.0, 10000.0)


@dataclass
class LatentNorm:
    basis: torch.Tensor  # M, (r, r)
    basis_inv: torch.Tensor  # M⁻¹
    readout: torch.Tensor  # (r, r): kv_b → kv_b · M⁻¹ · readout
    weight: float  # ρ, the norm's weight (all dims)
    spread_before: float  # coefficient of variation of rms(c) in the original basis
    spread_after: float


def _rms(latent: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return (latent.pow(2).mean(-1) + eps).sqrt()


def _spread(latent: torch.Tensor) -> float:
    rms = _rms(latent)
    return float(rms.std() / rms.mean())


def quadratic_fit(latent: torch.Tensor) -> torch.Tensor:
    """The minimum-norm least-squares symmetric ``P`` with ``cᵀ P c ≈ 1`` for every latent ``c``.

    Linear in the ``r(r+1)/2`` entries of ``P``. With more tokens than entries, solved on those
    features; with fewer (a latent of 512 and 4k tokens: 131k unknowns), the minimum-norm solution
    is a combination ``Σ_t α_t f_t`` of the tokens' features, whose Gram matrix
    ``f_s·f_t = 2 (c_s·c_t)² - Σ_i c_si² c_ti²`` needs no ``(tokens × r²/2)`` matrix: then
    ``P = 2 G - diag(G)`` with ``G = Σ_t α_t c_t c_tᵀ``."""
    tokens, rank = latent.shape
    if rank * (rank + 1) // 2 <= tokens:
        rows, cols = torch.triu_indices(rank, rank, device=latent.device)
        features = latent[:, rows] * latent[:, cols] * torch.where(rows == cols, 1.0, 2.0)
        target = torch.ones(tokens, 1, dtype=torch.float64, device=latent.device)
        packed = torch.linalg.lstsq(features, target).solution[:, 0]
        P = torch.zeros(rank, rank, dtype=torch.float64, device=latent.device)
        P[rows, cols] = packed
        return P + P.mT - torch.diag(P.diagonal())
    squares = latent.pow(2)
    kernel = (latent @ latent.mT).square_().mul_(2).sub_(squares @ squares.mT)  # in place: 2 (c·c)² - ...
    ones = torch.ones(tokens, 1, dtype=torch.float64, device=latent.device)
    alpha = _min_norm_solve(kernel, ones)[:, 0]
    G = latent.mT @ (latent * alpha.unsqueeze(-1))
    return 2 * G - torch.diag(G.diagonal())


def _min_norm_solve(kernel: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """``kernel⁺ rhs`` for a PSD ``kernel`` (a Gram matrix) and ``rhs`` in its range, as a Cholesky
    solve of ``kernel + λI``. ``λ`` is the round-off level ``n·eps·λ_max`` (where the pseudo-inverse
    this replaces cut eigenvalues off): for a consistent system it changes only directions below
    round-off, and it makes rank-deficient kernels (repeated tokens) factorable. ~n³/3 flops where an
    eigendecomposition takes ~9n³ (and a second n² matrix). ``kernel`` is overwritten."""
    tokens = len(kernel)
    diagonal = kernel.diagonal()
    largest = max(_largest_eigenvalue(kernel), float(diagonal.mean()), torch.finfo(kernel.dtype).tiny)
    round_off = tokens * torch.finfo(kernel.dtype).eps * largest
    added = 0.0
    for factor in KERNEL_RIDGES:  # a larger ridge only when round-off made the kernel indefinite
        diagonal.add_(factor * round_off - added)
        added = factor * round_off
        lower, info = torch.linalg.cholesky_ex(kernel)
        if int(info) == 0:
            return torch.cholesky_solve(rhs, lower)
    raise ValueError(
        f"latent norm: the {tokens}-token kernel is not positive semi-definite even with a ridge of "
        f"{KERNEL_RIDGES[-1]} x its round-off level; are the calibration latents finite?"
    )


def _largest_eigenvalue(matrix: torch.Tensor, steps: int = 16) -> float:
    """A lower bound on a PSD matrix's largest eigenvalue (power iteration; n² flops a step)."""
    vector = torch.ones(len(matrix), 1, dtype=matrix.dtype, device=matrix.device)
    for _ in range(steps):
        vector = matrix @ vector
        vector /= vector.norm().clamp_min(torch.finfo(matrix.dtype).tiny)
    return float(vector.mT @ matrix @ vector)


def fit_latent_norm(latent: torch.Tensor, flatten: bool = True) -> LatentNorm:
    """``latent``: ``(tokens, r)`` calibration latents (float64). ``flatten=False`` keeps the basis."""
    stride = -(-len(latent) // MAX_TOKENS)
    latent = latent[::stride].detach().to(torch.float64)
    rank = latent.shape[1]
    eye = torch.eye(rank, dtype=torch.float64, device=latent.device)
    basis = basis_inv = eye
    if flatten:
        eigvals, eigvecs = torch.linalg.eigh(quadratic_fit(latent))
        if eigvals.max() > 0:
            # cᵀPc ≈ 1 means ‖Mc‖ ≈ 1; scale by √r so the mapped latent keeps rms ≈ 1.
            eigvals = eigvals.clamp_min(EIGEN_FLOOR * eigvals.max()) * rank
            basis = eigvecs @ torch.diag(eigvals.sqrt()) @ eigvecs.mT
            basis_inv = eigvecs @ torch.diag(eigvals.rsqrt()) @ eigvecs.mT
    mapped = latent @ basis.mT
    power = mapped.pow(2).sum(-1)
    rms = _rms(mapped)
    weight = float((power / rms).sum() / (power / rms**2).sum())
    normed = weight * mapped / rms.unsqueeze(-1)
    gram = normed.mT @ normed
    gram += 1e-9 * gram.diagonal().mean() * eye
    readout = torch.linalg.solve(gram, normed.mT @ mapped).mT  # E[c' nᵀ] E[n nᵀ]⁻¹
    return LatentNorm(basis, basis_inv, readout, weight, _spread(latent), _spread(mapped))


def key_scale(latent_rows: torch.Tensor, key_rows: torch.Tensor) -> float:
    """The factor that gives the latent rows the RMS of the source's key rows: Adam's steps (an absolute
    size) are then as large, relative to ``kv_a_proj_with_mqa``, as they were relative to ``k_proj``."""
    return rms(key_rows) / max(rms(latent_rows), 1e-300)


def linear_regime_scale(latent: torch.Tensor | None, rows: torch.Tensor, eps: float) -> float:
    """The factor ``s`` that puts the latent ``c = s·(rows @ x)`` where ``RMSNorm(c) = c / √(eps + ms(c))``
    is linear: ``ms(c) ≤ LINEAR_MARGIN · eps`` on every calibration token (``latent``: their unscaled
    latents, ``(tokens, r)``), so the norm divides by ``√eps`` to within ``LINEAR_MARGIN / 2``; with a
    weight ``√eps / s`` it returns the unscaled latent. Without calibration, the bound is
    ``ms ≤ ‖rows‖₂² · ‖x‖² / r`` with ``‖x‖² ≤ 10·d`` (inputs leave an RMSNorm with gains near 1).

    Exact algebra, at a numerical price: the latent entering the norm is ~√(LINEAR_MARGIN·eps) in size
    (about 3e-5 for eps 1e-6): fine in fp32 and bf16 (same exponent range), subnormal in fp16, where its
    rounding (~6e-8 absolute) is of the order of bf16's relative precision."""
    rank = rows.shape[0]
    if latent is not None and len(latent):
        largest = float(latent.detach().to(torch.float64).pow(2).mean(-1).max())
    else:
        spectral = float(torch.linalg.matrix_norm(rows.to(torch.float64), ord=2))
        largest = spectral**2 * 10 * rows.shape[1] / rank
    return (LINEAR_MARGIN * eps / max(largest, 1e-300)) ** 0.5
