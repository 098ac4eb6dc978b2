"""curvlinops 2.x's estimator classes: exact where the estimator must be exact, unbiased (mean
of many samples within a few standard errors of the truth) elsewhere, repeatable under
``numpy.random.seed``, on numpy matrices and on our curvature operators."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torch_linop.curvlinops as curvlinops
from torch_linop import HessianOperator, supervised_loss
from torch_linop.reference import dense_hessian


@pytest.fixture
def matrix():
    rng = np.random.default_rng(0)
    basis, _ = np.linalg.qr(rng.standard_normal((30, 30)))
    return (basis * np.linspace(-2.0, 10.0, 30)) @ basis.T


def test_rademacher_samples_are_exact_on_diagonal_matrices():
    diagonal = np.diag(np.arange(1.0, 9.0))
    np.random.seed(0)
    assert curvlinops.HutchinsonTraceEstimator(diagonal).sample() == pytest.approx(36.0)
    np.testing.assert_allclose(
        curvlinops.HutchinsonDiagonalEstimator(diagonal).sample(), np.arange(1.0, 9.0)
    )


def test_hutchpp_with_a_full_basis_is_exact(matrix):
    np.random.seed(1)
    estimator = curvlinops.HutchPPTraceEstimator(matrix, basis_dim=30)
    assert estimator.sample() == pytest.approx(np.trace(matrix), abs=1e-10)


@pytest.mark.parametrize("distribution", ["rademacher", "normal"])
@pytest.mark.parametrize(
    "estimator_class, truth",
    [
        (curvlinops.HutchinsonTraceEstimator, np.trace),
        (curvlinops.HutchPPTraceEstimator, np.trace),
        (curvlinops.HutchinsonSquaredFrobeniusNormEstimator, lambda a: float((a**2).sum())),
    ],
    ids=["hutchinson", "hutch++", "frobenius"],
)
def test_sample_means_are_unbiased(matrix, estimator_class, truth, distribution):
    np.random.seed(2)
    estimator = estimator_class(matrix)
    samples = np.array([estimator.sample(distribution) for _ in range(2000)])
    stderr = samples.std() / np.sqrt(len(samples))
    assert abs(samples.mean() - truth(matrix)) < 5 * stderr + 1e-12


def test_seeded_runs_repeat_and_operators_work():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    data = [(torch.randn(8, 3, dtype=torch.float64), torch.randint(0, 2, (8,)))]
    H = HessianOperator(model, data, supervised_loss(F.cross_entropy))
    dense = dense_hessian(model, data, supervised_loss(F.cross_entropy)).numpy()
    np.random.seed(3)
    first = [curvlinops.HutchPPTraceEstimator(H, basis_dim=4).sample() for _ in range(3)]
    np.random.seed(3)
    again = [curvlinops.HutchPPTraceEstimator(dense, basis_dim=4).sample() for _ in range(3)]
    np.testing.assert_allclose(first, again, rtol=1e-10)  # same probes, same matrix


def test_bad_input():
    with pytest.raises(ValueError, match="square"):
        curvlinops.HutchinsonTraceEstimator(np.ones((3, 4)))
    with pytest.raises(ValueError, match="basis_dim"):
        curvlinops.HutchPPTraceEstimator(np.eye(3), basis_dim=4)
    with pytest.raises(ValueError, match="distribution"):
        curvlinops.HutchinsonTraceEstimator(np.eye(3)).sample("uniform")
