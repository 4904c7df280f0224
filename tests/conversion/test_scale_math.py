"""The reformulations that keep the fits small at real width give the same answers as the direct ones."""

from __future__ import annotations

import torch

from kvforge.conversion.transforms.latent_norm import quadratic_fit
from kvforge.conversion.transforms.merge import HeadTargets, group_cost, merge_values


def _direct_quadratic_fit(latent: torch.Tensor) -> torch.Tensor:
    rank = latent.shape[1]
    rows, cols = torch.triu_indices(rank, rank)
    features = latent[:, rows] * latent[:, cols] * torch.where(rows == cols, 1.0, 2.0)
    packed = torch.linalg.pinv(features) @ torch.ones(len(latent), dtype=torch.float64)
    P = torch.zeros(rank, rank, dtype=torch.float64)
    P[rows, cols] = packed
    return P + P.mT - torch.diag(P.diagonal())


def test_latent_quadratic_fit_with_fewer_tokens_than_unknowns_is_the_min_norm_solution():
    torch.manual_seed(0)
    for tokens, rank in [(20, 8), (200, 32)]:  # 36 and 528 unknowns: the kernel path
        latent = torch.randn(tokens, rank, dtype=torch.float64)
        expected = _direct_quadratic_fit(latent)
        assert (quadratic_fit(latent) - expected).abs().max() <= 1e-9 * expected.abs().max()


def test_latent_quadratic_fit_with_repeated_tokens_is_still_the_min_norm_solution():
    """Repeated latents (the same token at the same position) make the token kernel singular; the
    ridged Cholesky solve must still give the pseudo-inverse's answer (1e-9 relative)."""
    torch.manual_seed(1)
    unique = torch.randn(50, 16, dtype=torch.float64)  # 136 unknowns: the kernel path
    latent = torch.cat((unique, unique[:30], unique[:5]))
    expected = _direct_quadratic_fit(latent)
    assert (quadratic_fit(latent) - expected).abs().max() <= 1e-9 * expected.abs().max()


def _targets(n_heads=6, head_dim=4, d=40, seed=0) -> HeadTargets:
    generator = torch.Generator().manual_seed(seed)
    out = torch.randn(n_heads, d, head_dim, generator=generator, dtype=torch.float64)
    return HeadTargets(
        key=torch.randn(n_heads, head_dim // 2, d, generator=generator, dtype=torch.complex128),
        key_weight=torch.rand(n_heads, head_dim // 2, generator=generator, dtype=torch.float64) + 0.1,
        value=torch.randn(n_heads, head_dim, d, generator=generator, dtype=torch.float64),
        out_gram=out.mT @ out,
    )


def test_value_factor_has_the_value_gram_spectrum():
    targets = _targets()
    heads = [0, 2, 5]
    factor = targets.value_factor(heads)
    assert torch.allclose(factor.mT @ factor, targets.value_gram(heads), rtol=1e-10, atol=1e-9)


def test_merged_values_and_group_cost_match_the_d_model_eigenproblem():
    targets, heads, value_dim = _targets(), [1, 3, 4], 4
    eigvals, eigvecs = torch.linalg.eigh(targets.value_gram(heads))
    top = eigvecs[:, eigvals.argsort(descending=True)[:value_dim]]
    merged, error = merge_values(targets, heads, value_dim)
    assert torch.allclose(merged @ top @ top.mT, merged, atol=1e-9)  # spans the top eigenvectors
    assert abs(error - float(eigvals.sort(descending=True).values[value_dim:].sum())) <= 1e-8 * error
    assert group_cost(targets, heads, value_dim, (1.0, 1.0)) > 0


def test_merge_errors_from_the_gram_blocks_equal_the_merges_own():
    from kvforge.conversion.transforms.merge import merge_keys

    targets, heads, value_dim = _targets(n_heads=8, seed=1), [0, 3, 6], 4
    key_error, value_error = targets.merge_errors(heads, value_dim)
    assert abs(key_error - merge_keys(targets, heads)[2]) <= 1e-9 * key_error
    assert abs(value_error - merge_values(targets, heads, value_dim)[1]) <= 1e-9 * value_error
